"""Self-Forcing (DMD or SiD), one training step written out plainly: the student's chunk-by-chunk
rollout with its exit step, the DMD window and its first-frame re-encode, the score draws and
the losses. Loops over chunks and denoising steps; the DiT runs without a KV cache (the
committed chunks are recomputed at the commit timestep: primitives.causal_chunk_forward).

Random draws: the RAW numbers come from the same seeded streams as the recipe (StepContext's
shared ints and per-sample generators, the rollout's Noise keyed by (seed, frame, draw));
every law that turns them into levels, counts and masks is applied here:
    chunks  = min_chunks + stream "chunk_count".shared_int(max - min + 1)
    exit    = stream "exit_step".shared_int(steps)
    rollout noise: Noise(stream "rollout_noise".seeds()); draw 0 = a chunk's starting noise,
            draw j = the re-noise to step j, -1 = the commit pass's context noise
    score timestep k ~ randint(0, 1000) from sample i's generator of stream "dmd_timestep"
            (generator) / "critic_timestep" (critic); its noise from "dmd_noise" / "critic_noise"
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from forcelab.models.rollout import Noise

from .primitives import (add_noise, causal_chunk_forward, critic_flow_loss, dmd_generator_loss, guided_x0,
                         predict_x0, reencode_window_start, score_timestep, sid_generator_loss, warp_steps)

ROLLOUT_NOISE = "rollout_noise"                  # the stream of the rollout's per-sample Noise seeds
GENERATOR_DRAWS = ("dmd_timestep", "dmd_noise")  # streams of (score timestep, score noise) of the generator loss
CRITIC_DRAWS = ("critic_timestep", "critic_noise")   # ... of the critic loss
CHUNKS_DRAW, EXIT_DRAW = "chunk_count", "exit_step"  # shared streams of the rollout's chunk count, exit step


@dataclass
class Settings:
    """The recipe's algorithm settings, as algorithms.md states them (Self-Forcing defaults)."""
    chunk: int                                  # student's chunk_frames
    frames: int = 21                            # DMD window (the teacher's horizon)
    min_chunks: int = 7
    max_chunks: int = 7
    steps: list = field(default_factory=lambda: [1000, 750, 500, 250])
    warp_shift: float | None = 5.0              # None: the list is used as given
    context_noise: float = 0.0
    window: int | None = None                   # student's attention window (frames, incl. the chunk)
    sink: int = 0
    guidance: float = 4.0                       # uncond + g (cond - uncond): public w = 3 -> 4
    score_shift: float = 5.0
    t_min: float = 20.0
    t_max: float = 980.0
    snap_shift: float | None = None             # snap the score timestep to the shifted table (public: 5)
    loss: str = "dmd"                           # dmd | sid
    sid_alpha: float = 1.0
    reencode_first: bool = True
    prefix_frames: int = 0                      # first-frame conditioning: clean frames of the real clip


def draw_rollout(ctx, s: Settings) -> tuple[int, int]:
    """(chunks, exit step) of this rollout: uniform chunk count in [min, max], uniform exit."""
    chunks = s.min_chunks + ctx.stream(CHUNKS_DRAW).shared_int(s.max_chunks - s.min_chunks + 1)
    return chunks, ctx.stream(EXIT_DRAW).shared_int(len(s.steps))


def student_rollout(generator, context, noise: Noise, chunks: int, exit_step: int, grad_from: int,
                    s: Settings, grad: bool, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """The student's own video, chunk by chunk -> x0 [B, C, chunks * chunk, H, W] (the frames
    after the prefix).

    prefix [B, C, P, H, W] (first-frame conditioning): clean real frames committed first, like
    any chunk. Per chunk: start from pure noise at the list's first step; for step
    j = 0 .. exit: predict x0 at timesteps[j] against the committed frames; if j < exit,
    re-noise that x0 (detached, fresh noise) to timesteps[j + 1]. The chunk STOPS at the exit
    step: that x0 is its output, with gradient only when grad and the chunk starts at or after
    frame grad_from (inside the DMD window). Then the clean pass: the output, detached
    (noised to context_noise when > 0), joins the committed context at timestep context_noise.
    Noise is keyed by absolute frame (prefix included)."""
    ts = warp_steps(s.steps, s.warp_shift) if s.warp_shift else [float(t) for t in s.steps]
    B, c = context.shape[0], s.chunk
    past_x = past_t = None

    def commit(clean, f0):
        nonlocal past_x, past_t
        n = clean.shape[2]
        if s.context_noise > 0:
            clean = add_noise(clean, noise(f0, n, -1), s.context_noise / 1000)
        past_x = clean if past_x is None else torch.cat([past_x, clean], dim=2)
        t_c = torch.full((B, n), float(s.context_noise))
        past_t = t_c if past_t is None else torch.cat([past_t, t_c], dim=1)

    P = 0 if prefix is None else prefix.shape[2]
    if P:
        commit(prefix.float(), 0)
    out = []
    for k in range(chunks):
        f0 = P + k * c
        x = noise(f0, c, 0)
        for j in range(exit_step + 1):
            sigma = ts[j] / 1000
            t_in = torch.full((B, c), ts[j])
            with torch.set_grad_enabled(grad and j == exit_step and f0 >= grad_from):
                v = causal_chunk_forward(generator, past_x, past_t, x, t_in, context, c, s.window, s.sink)
                x0 = x - sigma * v
            if j < exit_step:
                x = add_noise(x0.detach(), noise(f0, c, j + 1), ts[j + 1] / 1000)
        out.append(x0)
        commit(x0.detach(), f0)
    return torch.cat(out, dim=2)


def generated_window(trainer, batch, ctx, s: Settings, grad: bool):
    """-> (x0 [B, C, window, H, W], mask [B, window]): the last `frames` frames of [prefix |
    rollout], the first one re-encoded when the video is longer (and then, for the generator,
    its chunk masked out of the loss: it holds a re-encoded latent). The generator's mask
    keeps the frames whose x0 carries gradient, the critic's every generated frame (prefix
    frames are real data: out of both losses)."""
    generator, context = trainer.module("generator"), batch["text_emb"]
    H, W = (n // trainer.codec.spatial_stride for n in (trainer.cfg.data.height, trainer.cfg.data.width))
    seeds = ctx.stream(ROLLOUT_NOISE).seeds()
    noise = Noise(seeds, generator.config.in_channels, H, W)
    chunks, exit_step = draw_rollout(ctx, s)
    P = s.prefix_frames
    prefix = batch["latent"][:, :, :P] if P else None
    total = P + chunks * s.chunk
    window = min(s.frames, total)
    rolled = student_rollout(generator, context, noise, chunks, exit_step, total - window, s, grad, prefix)
    full = rolled if P == 0 else torch.cat([prefix.to(rolled.dtype), rolled], dim=2)
    x0 = full[:, :, total - window:]
    mask = (torch.arange(total) >= P)[None, total - window:].repeat(x0.shape[0], 1)
    if total > window and s.reencode_first:
        first = reencode_window_start(trainer.codec, full, total - window)
        x0 = torch.cat([first, x0[:, :, 1:]], dim=2)
        if grad:
            mask[:, :s.chunk] = False
    return x0, mask


def score_draw(ctx, x0: torch.Tensor, draws: tuple[str, str], s: Settings):
    """-> (sigma [B] float32, noise [B, C, F, H, W]): t from the raw k per sample, shifted and
    clamped; sigma = t / 1000."""
    t = [score_timestep(int(torch.randint(0, 1000, (1,), generator=ctx.stream(draws[0]).generator(i))),
                        s.score_shift, s.t_min, s.t_max, s.snap_shift) for i in range(x0.shape[0])]
    return torch.tensor(t, dtype=torch.float32) / 1000, ctx.stream(draws[1]).normal(x0.shape[1:])


def generator_loss(trainer, batch, ctx, s: Settings) -> torch.Tensor:
    x0, mask = generated_window(trainer, batch, ctx, s, grad=True)
    return scored_generator_loss(trainer, x0, mask, batch["text_emb"], ctx, s)


def scored_generator_loss(trainer, x0, mask, context, ctx, s, weights=None) -> torch.Tensor:
    """DMD (or SiD) on generated x0 [B, C, F, H, W] over the frames in mask [B, F]: the teacher's
    guided and the critic's predictions at one drawn level (CausVid scores the same way).
    weights: per-sample weights of the DMD loss (Re-DMD), plain numbers; None: unweighted."""
    sigma, eps = score_draw(ctx, x0, GENERATOR_DRAWS, s)
    teacher, critic = trainer.module("teacher"), trainer.module("critic")
    if s.loss == "sid":
        # forcelab's choice (distill/dmd.py): frames outside the mask enter x_t detached, so
        # the masked re-encoded chunk gets no gradient through the scores' attention either
        x_in = torch.where(mask[:, None, :, None, None], x0, x0.detach())
        x_t = add_noise(x_in, eps, sigma)
        real = guided_x0(teacher, x_t, sigma, context, trainer.negative, s.guidance)
        fake = predict_x0(critic, x_t, sigma, context)
        return sid_generator_loss(x0, real, fake, s.sid_alpha, mask)
    with torch.no_grad():
        x_t = add_noise(x0.detach(), eps, sigma)
        real = guided_x0(teacher, x_t, sigma, context, trainer.negative, s.guidance)
        fake = predict_x0(critic, x_t, sigma, context)
    return dmd_generator_loss(x0, real, fake, mask, weights)


def critic_loss(trainer, batch, ctx, s: Settings) -> torch.Tensor:
    """The critic's own no-grad rollout (same draws law), then its flow-matching loss on all
    generated frames of the window."""
    with torch.no_grad():
        x0, mask = generated_window(trainer, batch, ctx, s, grad=False)
    sigma, eps = score_draw(ctx, x0, CRITIC_DRAWS, s)
    x_t = add_noise(x0, eps, sigma)
    fake = predict_x0(trainer.module("critic"), x_t, sigma, batch["text_emb"])
    return critic_flow_loss(fake, x0, eps, sigma, mask)
