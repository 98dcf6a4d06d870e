"""CausVid, one training step written out plainly: each chunk of the REAL clip picks its own
level from the list, the clip is noised, the causal student denoises it in ONE block-causal
forward, chunks at level 0 pass through as clean context (no gradient, out of the loss),
then DMD (or SiD) and the critic judge the clip exactly as in Self-Forcing.

Raw draws (the recipe's streams): level index ~ randint(0, len(levels), (1, chunks)) from
stream "chunk_levels" (sample i's generator); the clip's noise from stream "clip_noise"; the score draws as in
plain_recipes.self_forcing (10/11 generator, 20/21 critic).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .primitives import add_noise, critic_flow_loss, predict_x0
from .self_forcing import CRITIC_DRAWS, score_draw, scored_generator_loss

LEVELS, NOISE = "chunk_levels", "clip_noise"      # the recipe's stream names


@dataclass
class Settings:
    """CausVid's settings (algorithms.md): levels [1000, 757, 522, 0] per 3-frame block, score
    shift 8, guidance 3.5 in cond + w (cond - uncond) form = 4.5 in forcelab's form."""
    chunk: int
    frames: int = 21
    levels: list = field(default_factory=lambda: [1000.0, 757.0, 522.0, 0.0])
    guidance: float = 4.5
    score_shift: float = 8.0
    t_min: float = 20.0
    t_max: float = 980.0
    snap_shift: float | None = None
    loss: str = "dmd"
    sid_alpha: float = 1.0


def chunk_levels(ctx, batch: int, s: Settings) -> torch.Tensor:
    """t [B, frames]: per sample, one uniformly chosen level per chunk, over its frames."""
    chunks = s.frames // s.chunk
    rows = []
    for i in range(batch):
        idx = torch.randint(0, len(s.levels), (1, chunks), generator=ctx.stream(LEVELS).generator(i))
        rows.append([s.levels[int(j)] for j in idx[0] for _ in range(s.chunk)])
    return torch.tensor(rows, dtype=torch.float32)


def generated_clip(trainer, batch, ctx, s: Settings, grad: bool):
    """-> (x0 [B, C, frames, H, W], mask [B, frames]: the generated, non-clean frames)."""
    x0 = batch["latent"][:, :, :s.frames]
    t = chunk_levels(ctx, x0.shape[0], s)
    sigma = t / 1000
    x_t = add_noise(x0, ctx.stream(NOISE).normal(x0.shape[1:]), sigma)
    with torch.set_grad_enabled(grad):
        pred = predict_x0(trainer.module("generator"), x_t, sigma, batch["text_emb"], chunk_frames=s.chunk)
    clean = t == 0
    # clean chunks are the data itself: no prediction, no gradient
    out = torch.where(clean[:, None, :, None, None], x0, pred)
    return out, ~clean


def generator_loss(trainer, batch, ctx, s: Settings) -> torch.Tensor:
    x0, mask = generated_clip(trainer, batch, ctx, s, grad=True)
    return scored_generator_loss(trainer, x0, mask, batch["text_emb"], ctx, s)


def critic_loss(trainer, batch, ctx, s: Settings) -> torch.Tensor:
    with torch.no_grad():
        x0, mask = generated_clip(trainer, batch, ctx, s, grad=False)
    sigma, eps = score_draw(ctx, x0, CRITIC_DRAWS, s)
    fake = predict_x0(trainer.module("critic"), add_noise(x0, eps, sigma), sigma, batch["text_emb"])
    return critic_flow_loss(fake, x0, eps, sigma, mask)
