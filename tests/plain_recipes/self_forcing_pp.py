"""Self-Forcing++, one training step written out plainly from the paper (no public code): roll
the student far past the teacher's horizon, take a window of the long self-generated video,
re-noise it from the student's own frames (backward-noise initialisation) and judge it with
DMD against the short teacher. No rollout engine, no KV cache, no recipe module.

Per loss call, with L = rollout_frames, T = frames (the teacher's horizon), c = chunk,
S = len(steps), draws shared by every process:
    start ~ c * U{0 .. (L - T) / c}       the window [start, start + T), chunk aligned
    entry ~ U{0 .. S - 1}                 the level the window re-enters at
1. No gradients: the student generates all L frames chunk by chunk over its whole denoising
   list, attending to a rolling window of `window` frames (no sink by default).
2. Backward noise: each window chunk re-enters at sigma_e = steps[entry] from its own long-
   rollout frames, x = (1 - sigma_e) x_hat + sigma_e eps (fresh eps), and is denoised in ONE
   pass with gradients, after the long video's frames before the window and the window's
   re-generated earlier chunks (detached context); that x0 is the chunk's output and context.
3. DMD (critic: flow matching) on the T window frames. A window after the video's start gets
   its first latent re-encoded (the T - 1 long-rollout latents before it and the window's
   first decoded together, the last pixel frame encoded alone) and that chunk is left out of
   the generator's loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .primitives import add_noise, reencode_window_start, sigma_from_t, warp_steps, x0_from_flow
from .rolling_forcing import INITIAL, Scores, clean_pass_inputs, distribution_matching, student_flow

WINDOW_DRAW, ENTRY_DRAW = "window_start", "entry_step"          # the recipe's shared streams
ROLLOUT_NOISE, BACKWARD_NOISE = "rollout_noise", "backward_noise"   # its streams of per-sample noise seeds


@dataclass
class PPOptions:
    steps: list[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])
    warp_shift: float = 5.0
    frames: int = 21                    # T, the teacher's horizon
    rollout_frames: int = 84            # L
    chunk: int = 3
    window: int | None = 21             # the student's attention window (rolling cache)
    sink: int = 0
    context_noise: float = 0.0
    reencode_first: bool = True


def draw_window(ctx, o: PPOptions) -> tuple[int, int]:
    starts = (o.rollout_frames - o.frames) // o.chunk + 1
    return o.chunk * ctx.stream(WINDOW_DRAW).shared_int(starts), ctx.stream(ENTRY_DRAW).shared_int(len(o.steps))


def _flow(model, committed, x, sigma, context, noise, o):
    past = torch.cat(committed, dim=2) if committed else None
    past_in = None if past is None else clean_pass_inputs(past, 0, noise, o.context_noise)
    return student_flow(model, past_in, o.context_noise, x, sigma, context, o.chunk, o.window, o.sink)


@torch.no_grad()
def long_rollout(model, context, noise, o: PPOptions) -> torch.Tensor:
    """All L frames, chunk by chunk over the whole denoising list -> [B, C, L, H, W]."""
    c = o.chunk
    sigmas = [sigma_from_t(t) for t in warp_steps(o.steps, o.warp_shift)] + [0.0]
    committed = []
    for f0 in range(0, o.rollout_frames, c):
        x = noise(f0, c, INITIAL)
        for j in range(len(o.steps)):
            sigma = torch.full((x.shape[0], c), sigmas[j])
            x0 = x0_from_flow(x, _flow(model, committed, x, sigma, context, noise, o), sigma)
            if j + 1 < len(o.steps):
                x = add_noise(x0, noise(f0, c, j + 1), sigmas[j + 1])
        committed.append(x0)
    return torch.cat(committed, dim=2)


def self_forcing_pp_loss(role: str, generator, context: torch.Tensor, ctx, noise, fresh, codec, scores: Scores,
                         o: PPOptions) -> torch.Tensor:
    """One loss call for `role`. noise: the rollout's per-frame Gaussian source; fresh: the
    backward-noise eps source (both Noise objects)."""
    start, entry = draw_window(ctx, o)
    T, c = o.frames, o.chunk
    video = long_rollout(generator, context, noise, o)
    x_hat = video[:, :, start:start + T]
    sigma_e = sigma_from_t(warp_steps(o.steps, o.warp_shift)[entry])
    committed = [video[:, :, :start]] if start else []
    out = []
    with torch.set_grad_enabled(role == "generator"):
        for k in range(0, T, c):
            x = add_noise(x_hat[:, :, k:k + c], fresh(start + k, c, INITIAL), sigma_e)
            sigma = torch.full((x.shape[0], c), sigma_e)
            x0 = x0_from_flow(x, _flow(generator, committed, x, sigma, context, noise, o), sigma)
            out.append(x0)
            committed.append(x0.detach())
    x0 = torch.cat(out, dim=2)
    mask = torch.ones(x0.shape[0], T, dtype=torch.bool)
    if start and o.reencode_first:
        before = video[:, :, max(0, start - (T - 1)):start]
        first = reencode_window_start(codec, torch.cat([before, x0[:, :, :1].detach()], dim=2), before.shape[2])
        x0 = torch.cat([first, x0[:, :, 1:]], dim=2)
        if role == "generator":
            mask[:, :c] = False
    return distribution_matching(role, x0, mask, context, ctx, scores)
