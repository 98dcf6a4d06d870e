"""LongLive streaming long tuning (stage 2), written out plainly from the LongLive paper and the
recipe notes: train long, test long. No rollout engine, no KV cache, no recipe module.

The generator's sequence persists across loss calls (generator AND critic calls advance it):

    first call of a sequence   frames [0, frames)           window = those frames
    later call                 new frames [e, e + new)      window = the last `overlap` frames
                                                            (overlap = frames - new) + the new ones

At the sequence length (frames + k * new <= max_frames) a new sequence starts with new prompts
and new noise seeds. Once per sequence, at a call start drawn from the candidates (LongLive:
21, 39, ..., 201), the prompt switches with a KV recache: cross-attention moves to the new
prompt, the self-attention context is cleared except the sink, and the last `recache_frames`
frames are re-run at t = context_noise with the new prompt. The teacher judges the window
with the prompt active at its first new frame. Each call generates its new frames chunk by
chunk (the Self-Forcing exit: each chunk stops at one exit step drawn per call); all new
chunks carry gradient; the context (earlier frames) is detached; only the new frames enter
the DMD and the critic loss. The window's first frame, an overlap frame, is re-encoded.

How the plain version holds "the cache": every committed frame's clean latent and the prompt
its keys/values were last written with. A pass recomputes them (block-causal over the whole
sequence, window + sink, committed frames at context_noise) - exact for this layout as long
as no visible frame was cleared, i.e. when the recache covers every frame after the sink
(checked). Weights must not change between calls (a cache keeps keys computed by older
weights; a recomputation cannot). Both sink treatments at a switch: kept (LongLive's
inference and the paper; forcelab's default) or wiped for the rest of the sequence (the
public training code, `keep_sink: false`).

The first-frame re-encode follows LongLive (model/streaming_training.py): the previous
teacher window (the `frames` latents before the new ones) is decoded together up to and
including the window's first latent, and the last pixel frame is encoded alone. (Self-Forcing
decodes everything before the window; a stream of bounded memory does not keep that.)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from forcelab.models.rollout import Noise

from .primitives import add_noise, reencode_window_start, sigma_from_t, warp_steps, x0_from_flow
from .rolling_forcing import EXIT_DRAW, INITIAL, Scores, clean_pass_inputs, distribution_matching, student_flow

SWITCH_DRAW, NOISE_DRAW = "switch_frame", "sequence_noise"   # the recipe's streams: switch frame, noise seeds


@dataclass
class StreamOptions:
    steps: list[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])
    warp_shift: float = 5.0
    frames: int = 21                    # the teacher's window
    new_frames: int = 18
    max_frames: int = 240
    chunk: int = 3
    window: int | None = None           # attention window incl. the chunk
    sink: int = 0
    context_noise: float = 0.0
    switch: bool = True
    switch_frames: list[int] | None = None   # candidates (None: every call start but the last)
    recache_frames: int | None = None   # None: `frames`
    keep_sink: bool = True              # the sink survives a switch (False: the public training code's wipe)
    reencode_first: bool = True


@contextmanager
def frame_prompts(model, segments, tokens_per_frame: int):
    """Inside: the tokens of frames [a, b) read cross-attention keys/values of `prompt`, for
    each (a, b, prompt) in segments (the frames whose cached keys were written under another
    prompt than the current one). Cross-attention acts per token, so this is exactly a
    forward in which those frames were computed with their own prompt."""
    kvs = [(a * tokens_per_frame, b * tokens_per_frame, model.context_kv(prompt)) for a, b, prompt in segments]

    def hook(layer):
        def swap(module, args, out):
            x, out = args[0], out.clone()
            for lo, hi, kv in kvs:
                out[:, lo:hi] = module.forward(x[:, lo:hi], kv[layer])
            return out
        return swap

    handles = [blk.cross_attn.register_forward_hook(hook(i)) for i, blk in enumerate(model.blocks)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class PlainStreamingLong:
    """The reference's sequence state and its loss call (one per trainer micro-step)."""

    def __init__(self, o: StreamOptions, generator, codec, scores: Scores, read_prompts, latent_chw):
        self.o, self.generator, self.codec, self.scores = o, generator, codec, scores
        self.read_prompts, self.latent_chw = read_prompts, latent_chw
        self.timesteps = warp_steps(o.steps, o.warp_shift)
        self.overlap = o.frames - o.new_frames
        self.length = o.frames + o.new_frames * ((o.max_frames - o.frames) // o.new_frames)
        self.recache = o.frames if o.recache_frames is None else o.recache_frames
        self.prompt = None
        self.end = 0

    # ------------------------------------------------------------------ sequence events
    def start_sequence(self, ctx) -> None:
        o = self.o
        starts = list(range(o.frames, self.length, o.new_frames))
        candidates = o.switch_frames if o.switch_frames is not None else starts[:-1]
        self.switch_at = candidates[ctx.stream(SWITCH_DRAW).shared_int(len(candidates))] if o.switch and candidates else -1
        self.prompt = self.read_prompts(ctx.positions)
        self.noise = Noise(ctx.stream(NOISE_DRAW).seeds(), *self.latent_chw)
        self.clean, self.written, self.end = None, [], 0
        self.first, self.sink = 0, self.o.sink      # the oldest frame still visible; the sink frames

    def switch_prompt(self, ctx) -> None:
        """KV recache: the frames [lo, end), lo = max(sink, end - recache), are rewritten with
        the new prompt; the sink keeps the keys it was written with (keep_sink) or is wiped
        for the rest of the sequence (then the visible video starts at lo: RoPE depends only
        on distances, so the forward may lay it out from position 0)."""
        self.prompt = self.read_prompts(ctx.positions)
        lo = max(self.o.sink, self.end - self.recache)
        if lo > self.o.sink and self.o.keep_sink:
            raise NotImplementedError("recache of fewer frames than follow the sink: the cleared frames "
                                      "cannot be hidden from a cache-less forward")
        if not self.o.keep_sink:
            assert lo % self.o.chunk == 0, "the visible video must start at a chunk boundary"
            self.first, self.sink = lo, 0
        for f in range(lo, self.end):
            self.written[f] = self.prompt

    # ------------------------------------------------------------------ one call
    def loss(self, role: str, ctx) -> torch.Tensor:
        if self.prompt is None or self.end >= self.length:
            self.start_sequence(ctx)
        elif self.switch_at == self.end:
            self.switch_prompt(ctx)
        with torch.set_grad_enabled(role == "generator"):
            x0, mask = self.generate(ctx)
        return distribution_matching(role, x0, mask, self.prompt, ctx, self.scores)

    def _segments(self, start: int):
        """[(a, b, prompt)]: runs of visible past frames written under another prompt than the
        current one, counted from the first visible frame."""
        out = []
        for f in range(self.first, start):
            p, i = self.written[f], f - self.first
            if p is self.prompt:
                continue
            if out and out[-1][1] == i and out[-1][2] is p:
                out[-1] = (out[-1][0], i + 1, p)
            else:
                out.append((i, i + 1, p))
        return out

    def _flow(self, x, sigma, start):
        o, model = self.o, self.generator
        past = None
        if start > self.first:
            past = clean_pass_inputs(self.clean[:, :, self.first:start], self.first, self.noise, o.context_noise)
        S = model.config.tokens_per_frame(x.shape[3], x.shape[4])
        with frame_prompts(model, self._segments(start), S):
            return student_flow(model, past, o.context_noise, x, sigma, self.prompt, o.chunk, o.window, self.sink)

    def generate(self, ctx):
        """-> (window x0 [B, C, frames, H, W], mask [B, frames]); advances the sequence."""
        o = self.o
        start = self.end
        n = o.frames if start == 0 else o.new_frames
        exit_step = ctx.stream(EXIT_DRAW).shared_int(len(self.timesteps))
        sigmas = [sigma_from_t(t) for t in self.timesteps] + [0.0]
        new = []
        for f0 in range(start, start + n, o.chunk):
            x = self.noise(f0, o.chunk, INITIAL)
            for j in range(exit_step + 1):
                sigma = torch.full((x.shape[0], o.chunk), sigmas[j])
                with torch.set_grad_enabled(j == exit_step and torch.is_grad_enabled()):
                    x0 = x0_from_flow(x, self._flow(x, sigma, f0), sigma)
                if j < exit_step:
                    x = add_noise(x0.detach(), self.noise(f0, o.chunk, j + 1), sigmas[j + 1])
            new.append(x0)            # the exit pass's x0: output and committed context
            clean = x0.detach()
            self.clean = clean if self.clean is None else torch.cat([self.clean, clean], dim=2)
            self.written += [self.prompt] * o.chunk
        self.end = start + n
        ov = min(self.overlap, start)
        x0 = torch.cat([self.clean[:, :, start - ov:start]] + new, dim=2)
        if ov and o.reencode_first:
            previous = self.clean[:, :, max(0, start - o.frames):start]     # the previous window
            first = reencode_window_start(self.codec, previous, previous.shape[2] - ov)
            x0 = torch.cat([first, x0[:, :, 1:]], dim=2)
        mask = torch.tensor([False] * ov + [True] * n)[None].expand(x0.shape[0], -1)
        return x0, mask
