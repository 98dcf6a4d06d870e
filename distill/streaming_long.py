"""Streaming long tuning (LongLive stage 2): train long, test long.

The generator's sequence state persists ACROSS optimizer steps: every loss call extends the
same video of each sample by a chunk of new frames with the rollout engine, continuing the
KV cache of the step before (`rollout(..., cache=...)`):

    step 1 of a sequence   frames [0, frames)                       window = those frames
    step k > 1             new frames [e, e + new_frames)            window = the last
                           (e = frames generated so far)            `overlap` frames + the new ones

with overlap = frames - new_frames, so the teacher (DMD real score) and the critic always see
`frames` frames, its horizon: the newest window. Only the new frames carry gradients (their
exit pass; the cache and the overlap frames are detached) and only they enter the DMD and the
critic loss (LongLive masks both). When the window starts with an overlap frame, that latent
is replaced by a clip's first latent (`reencode_first`, as Self-Forcing does; it is masked
anyway): LongLive decodes its previous window (the `frames` latents before the new ones) up to
and including the window's first latent and encodes the last pixel frame alone. This recipe
keeps those latents for it (`recent`) and does the same; a VAE decode of the whole video so far
would grow with the sequence, and the public code never holds more than that window.
Critic steps advance the sequence too (the public code's behaviour): with the generator every
5th step, a sequence advances once per critic step plus once per generator step.

At the sequence length (the longest frames + k * new_frames <= max_frames) a new sequence
starts with new prompts. Once per sequence (`switch`) the prompt changes at a step start drawn
from `switch_frames` (LongLive: 21, 39, ..., 201): KV recache - the cross-attention moves to the
new prompt, the self-attention cache is cleared except the sink, and the last `recache_frames`
frames after the sink are re-run at t = context_noise with the new prompt (the engine's
"recache" switch; at a step start it is the cache's `reset(keep_sink=True)` and the frames
committed again as the rollout's `prefix`, one block-causal pass; LongLive's recache pass has
no block mask). The public training code wipes the sink too and
never rewrites it: `keep_sink: false` reproduces that. The teacher judges the window with the
prompt active at its first new frame.

Random streams: "exit_step" (per call, shared by the ranks), "switch_frame" (per sequence,
shared), "sequence_noise" (each sample's noise seed, from its position when the sequence
starts); the score draws are the base recipe's.

Prompts: the trainer's per-step batches carry only sample positions; a prompt batch is read
from the configured source (the micro-batch's positions) only when a sequence starts or
switches, so a prompt file is sampled sparsely, never read twice at one position.

Checkpoints save the sequence state per rank (the cache tensors - computed by weights that no
longer exist, so they cannot be rebuilt from latents -, the recent frames, prompts, noise seeds
and position), each rank into its own file (rng-rankR.pt, written by that rank: nothing is
gathered, so a Wan-scale cache costs each rank its own share of disk writes, not rank 0's memory):
a resume continues mid-sequence bit for bit. `checkpoint_stream: false` saves less and starts a
new sequence on resume instead, as a resume at another number of processes does.

Optional LoRA (`lora_rank` > 0, peft) on the attention and FFN linears of the generator and the
critic: see distill/lora.py (checkpoints keep merged weights plus the adapters; EMA is not
kept with LoRA, as in LongLive).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CheckpointError, ConfigError
from ..models.cache_policy import DEFAULT_POLICY, check_policy
from ..models.plans import Chunkwise
from ..models.rollout import Noise, Training, make_cache, rollout
from ..train import checkpoint as ckpt_io
from ..train.data import ShardStream
from ..train.roles import load_pending, resolve_init
from . import lora
from ..validate import (choice, each, in_range, multiple_of, non_negative_int, optional, positive_float,
                        positive_int, setting)
from ..train.workload import DMDWorkload, cache_capacity, rollout_passes
from .dmd_recipe import CHUNK, DMDOptions, DMDRecipe, Generated, check_cache, student_chunk


@dataclass
class StreamingLongOptions(DMDOptions):
    new_frames: int = setting(18, positive_int)     # frames each later step adds (overlap = frames - new_frames)
    max_frames: int = setting(240, positive_int)    # sequence length limit: then new prompts and a new sequence
    # generator attention window incl. the chunk (None: model config)
    window_frames: int | None = setting(None, optional(non_negative_int))
    sink_frames: int | None = setting(None, optional(non_negative_int))   # frames kept visible forever (None: model config)
    # what the full window keeps, merges or hides (models/cache_policy.py: NAME[:key=value,...])
    cache_policy: str = setting(DEFAULT_POLICY, check_policy)
    switch: bool = True                 # one prompt switch per sequence
    # candidate switch frames, step starts (None: all but the last)
    switch_frames: list[int] | None = setting(None, optional(each(non_negative_int)))
    # frames re-run with the new prompt at a switch (None: `frames`)
    recache_frames: int | None = setting(None, optional(non_negative_int))
    keep_sink: bool = True              # the sink survives a switch (false: the public training code's wipe)
    reencode_first: bool = True         # re-encode the window's first (overlap) frame through the VAE
    checkpoint_stream: bool = True      # save the sequence state for a bit-exact resume
    lora_rank: int = setting(0, non_negative_int)   # > 0: LoRA adapters (peft) instead of full fine-tuning
    lora_alpha: float | None = setting(None, optional(positive_float))   # LoRA scale alpha / rank (None: alpha = rank)
    lora_roles: list[str] = setting(["generator", "critic"], each(choice, ("generator", "critic")))

    def check(self, model=None) -> None:
        super().check(model)
        chunk = student_chunk(model)
        in_range(self.new_frames, "algo.new_frames", 1, self.frames, integer=True,
                 why="algo.frames: the teacher window is the overlap plus the new frames")
        in_range(self.max_frames, "algo.max_frames", self.frames, None, integer=True, why="algo.frames")
        if chunk is not None:
            for key in ("frames", "new_frames"):
                multiple_of(getattr(self, key), f"algo.{key}", chunk, CHUNK)
        starts = self.step_starts()
        bad = [f for f in self.switch_frames or [] if f not in starts]
        if bad:
            raise ConfigError(f"algo.switch_frames: {bad} are not step starts of a sequence ({starts[:4]}... up to "
                              f"{self.sequence_length()} frames: frames + k * new_frames)")
        check_cache(self.windowed_plan(self.timesteps()), model, "algo.window_frames / algo.sink_frames / algo.cache_policy")

    def windowed_plan(self, timesteps: list[float]) -> Chunkwise:
        """The generator's chunk-wise plan with its attention window and sink."""
        return self.plan(timesteps, window_frames=self.window_frames, sink_frames=self.sink_frames,
                         cache_policy=self.cache_policy)

    def sequence_length(self) -> int:
        """Frames of one sequence: the longest frames + k * new_frames <= max_frames."""
        return self.frames + self.new_frames * ((self.max_frames - self.frames) // self.new_frames)

    def step_starts(self) -> list[int]:
        """Frames where the steps after a sequence's first one start (the last ends the sequence)."""
        return list(range(self.frames, self.sequence_length(), self.new_frames))


class PromptsOnDemand:
    """The trainer's stream: batches of positions only. `prompts(positions)` reads the source."""

    def __init__(self, source):
        self.source = source

    def batch(self, positions: list[int]) -> dict:
        return {"positions": torch.tensor(positions)}

    def prompts(self, positions: list[int]) -> dict:
        return self.source.batch(positions)

    def captions(self, n: int) -> list[str]:
        return self.source.captions(n)


@dataclass
class Sequence:
    """One batch of videos in progress (this rank's)."""
    prompt: torch.Tensor                # [B, L, text_dim] the prompt active now
    seeds: list[int]                    # the rollout noise's per-sample seeds
    cache: object                       # the generator's KVCache
    switch_at: int                      # frame where the prompt switches (-1: none)
    end: int = 0                        # frames generated so far
    recent: torch.Tensor | None = None  # [B, C, n, H, W] clean latents of frames [end - n, end)
    recache: bool = False               # the next step re-commits the recent frames (a switch)


class StreamingLongRecipe(DMDRecipe):
    name = "streaming_long"
    starts_from = {"teacher": "teacher", "generator": "ode_init"}   # Self-Forcing's recipe: the student from ODE init
    Options = StreamingLongOptions

    # ------------------------------------------------------------------ roles and data
    @classmethod
    def prepare_role(cls, cfg, role) -> None:
        o = cfg.algo
        if not o.lora_rank or role.name not in o.lora_roles or not role.trainable:
            return
        if role.source.startswith("random:"):
            raise ConfigError(f"roles.{role.name}.init: LoRA adapts given weights; set an init (or lora_rank=0)")
        if role.cfg.ema_decay is not None:
            raise ConfigError(f"roles.{role.name}.ema_decay: no EMA with LoRA adapters (LongLive skips it); "
                              f"remove it or set algo.lora_rank=0")
        # adapters wrap loaded weights: a role left on meta for rank-local loading is read whole
        # (on the CPU: sharding moves it to the process's device)
        load_pending(role, torch.device("cpu"))
        alpha = o.lora_rank if o.lora_alpha is None else o.lora_alpha
        role.params = lora.add_lora(role.module, o.lora_rank, alpha, cfg.seed, role.name)

    @classmethod
    def workload(cls, opt, frames, chunk):
        """A sequence's first step (its `frames` frames all new, with gradients: the largest
        step) against the sink + window cache (a window or sink left to the generator's config
        counts as none here). LoRA adapters are not modelled: full fine-tuning."""
        window, sink = opt.window_frames or None, opt.sink_frames or 0
        passes = rollout_passes("generator", opt.frames, chunk, len(opt.steps), 0, window, sink)
        return DMDWorkload(passes, opt.frames, cache_capacity(opt.max_frames, chunk, window, sink)).updates()

    def make_stream(self):
        self.prompt_source = PromptsOnDemand(self.run.data_stream("prompts"))
        return self.prompt_source

    def setup(self) -> None:
        super().setup()
        o = self.opt                    # checked by o.check(chunk)
        self.overlap = o.frames - o.new_frames
        self.length = o.sequence_length()
        self.switch_candidates = list(o.switch_frames) if o.switch_frames is not None else o.step_starts()[:-1]
        self.recache_frames = o.frames if o.recache_frames is None else o.recache_frames
        # the re-encode decodes the previous window (`frames` latents) up to the window's first
        self.keep_recent = max(self.overlap, self.recache_frames, o.frames if o.reencode_first and self.overlap else 0)
        self.seq: Sequence | None = None
        self.sequences = 0

    @classmethod
    def sampling_plan(cls, opt):
        return opt.windowed_plan(opt.timesteps())

    def plan(self):
        return self.opt.windowed_plan(self.timesteps)

    # ------------------------------------------------------------------ the sequence
    def loss(self, role, batch, ctx):
        seq = self.seq
        if seq is None or seq.end >= self.length:
            self.start_sequence(ctx)
        elif seq.switch_at == seq.end:
            self.switch_prompt(ctx)
        # the scores judge the window with the prompt active at its first new frame
        return super().loss(role, {"text_emb": self.seq.prompt}, ctx)

    def _read_prompts(self, ctx) -> torch.Tensor:
        return self.prompt_source.prompts(ctx.positions)["text_emb"].to(ctx.device)

    def start_sequence(self, ctx) -> None:
        o, B = self.opt, len(ctx.positions)
        model = self.run.module("generator")
        switch_at = -1
        if o.switch and self.switch_candidates:
            switch_at = self.switch_candidates[ctx.stream("switch_frame").shared_int(len(self.switch_candidates))]
        cache = make_cache(model, self.plan(), B, *self.latent_hw, self.length)
        self.seq = Sequence(self._read_prompts(ctx), ctx.stream("sequence_noise").seeds(), cache, switch_at)
        self.sequences += 1

    def switch_prompt(self, ctx) -> None:
        """New prompt at a step start; the cache is cleared (but the sink, unless keep_sink is
        off) and the next rollout re-commits the recent frames with the new prompt."""
        seq = self.seq
        seq.prompt = self._read_prompts(ctx)
        seq.cache.reset(keep_sink=self.opt.keep_sink)
        seq.recache = self.recache_frames > 0

    def noise(self, ctx, stream: str = "sequence_noise") -> Noise:
        """The sequence's noise (its seeds were drawn from `stream` when it started)."""
        return Noise(self.seq.seeds, self.run.module("generator").config.in_channels, *self.latent_hw,
                     device=ctx.device)

    def generate(self, batch, ctx, grad):
        o, seq = self.opt, self.seq
        start = seq.end
        n = o.frames if start == 0 else o.new_frames
        exit_step = ctx.stream("exit_step").shared_int(len(self.timesteps))
        prefix = None
        if seq.recache:
            lo = max(seq.cache.sink_frames, start - self.recache_frames)
            prefix = seq.recent[:, :, seq.recent.shape[2] - (start - lo):] if start > lo else None
            seq.recache = False
        # every chunk stops at the exit step; only the generator step's exit passes keep a graph
        # (the critic's rollout runs under no_grad, which the engine's training hooks respect)
        training = Training(exit_step, grad_from_frame=start)
        res = rollout(self.run.model("generator"), self.plan(), seq.prompt, self.noise(ctx), n,
                      cache=seq.cache, start_frame=start, prefix=prefix, training=training)
        ov = min(self.overlap, start)
        x0 = res.x0 if ov == 0 else torch.cat([seq.recent[:, :, -ov:].to(res.x0.dtype), res.x0], dim=2)
        if ov and o.reencode_first:
            kept = seq.recent.shape[2]  # recent: frames [start - kept, start); the window starts at start - ov
            x0 = self.reencoded(x0, seq.recent[:, :, max(0, kept - o.frames):kept - ov + 1])
        clean = res.x0.detach()
        seq.recent = clean if seq.recent is None else torch.cat([seq.recent, clean], dim=2)
        seq.recent = seq.recent[:, :, -self.keep_recent:] if self.keep_recent else seq.recent[:, :, :0]
        seq.end = start + n
        new = res.grad_frames.cpu() if grad else torch.ones(n, dtype=torch.bool)
        mask = torch.cat([torch.zeros(ov, dtype=torch.bool), new])
        return Generated(x0, mask.to(x0.device)[None].expand(x0.shape[0], -1))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        out = {"sequences": self.sequences}
        source = self.prompt_source.source
        if isinstance(source, ShardStream):
            out["prompt_batches"] = source.read
        seq = self.seq
        if seq is not None and self.opt.checkpoint_stream:
            out["sequence"] = {"prompt": seq.prompt.cpu(), "seeds": list(seq.seeds), "switch_at": seq.switch_at,
                               "end": seq.end, "recache": seq.recache, "cache": seq.cache.state_dict(),
                               "recent": None if seq.recent is None else seq.recent.cpu()}
        if self.opt.lora_rank and self.run.is_main:   # identical on every rank: written once
            out["lora"] = {r: lora.adapter_state(self.run.module(r)) for r in self._lora_roles()}
        return out

    def load_state_dict(self, state: dict) -> None:
        self.sequences = int(state.get("sequences", 0))
        source = self.prompt_source.source
        if isinstance(source, ShardStream):
            source.skip(int(state.get("prompt_batches", 0)))
        s = state.get("sequence")
        if s is not None:
            device = self.run.device
            cache = make_cache(self.run.module("generator"), self.plan(), s["prompt"].shape[0],
                               *self.latent_hw, self.length)
            cache.load_state_dict(s["cache"])
            self.seq = Sequence(s["prompt"].to(device), list(s["seeds"]), cache, int(s["switch_at"]),
                                int(s["end"]), None if s["recent"] is None else s["recent"].to(device),
                                bool(s["recache"]))
        if self.opt.lora_rank:
            self._load_lora(state)

    def shared_state(self, state: dict) -> dict:
        """At another number of processes: the sequence count and LoRA adapters; each rank starts
        new sequences (a sequence's cache belongs to its rank's samples)."""
        return {k: state[k] for k in ("sequences", "lora") if k in state}

    def _lora_roles(self) -> list[str]:
        return [r for r in self.opt.lora_roles if self.run.trainable(r)]

    def _load_lora(self, state: dict) -> None:
        """The resumed roles were built from the checkpoint's merged weights: put the frozen
        base back from the role's init source and the adapters from the checkpoint."""
        from ..models.dit import CausalDiT

        t = self.run
        saved = state.get("lora") if t.is_main else ckpt_io.load_rank_state(t.resume_from, 0).get("recipe", {}).get("lora")
        if saved is None:
            raise CheckpointError(f"checkpoint {t.resume_from}: no LoRA adapters saved; it was written with "
                                  f"algo.lora_rank=0 - resume with the same settings")
        for name in self._lora_roles():
            weights, _ = resolve_init(self.cfg, self.roles, name)
            if weights is None:
                raise ConfigError(f"roles.{name}.init: LoRA needs the base weights it was trained on")
            module = t.module(name)
            plain = CausalDiT.from_pretrained(weights, config=module.config, device="cpu", dtype=torch.float32)
            lora.load_base(module, plain)
            lora.load_adapter_state(module, saved[name])
