"""The flow-matching loss every v-predicting recipe regresses (Wan2.1's objective), and the
frame-masked mean the losses share.

    x_t = (1 - sigma) x0 + sigma noise;  the DiT predicts v;  loss = mean((v - (noise - x0))^2)

Frame masks are bool [B, F]: frames outside the mask get no gradient and are left out of the
mean (CausVid's clean chunks, LongLive's overlap frames, ODE init's clean chunks).
"""

from __future__ import annotations

import torch

from ..models.schedule import flow_target


def frame_weights(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """bool [B, F] -> 0/1 weights broadcastable against [B, C, F, H, W] (like's dtype)."""
    if mask is None:
        return None
    B, _, F = like.shape[:3]
    if tuple(mask.shape) != (B, F):
        raise ValueError(f"frame mask must be [B, F] = [{B}, {F}], got {tuple(mask.shape)}")
    return mask.to(device=like.device, dtype=like.dtype)[:, None, :, None, None]


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of values [B, C, F, H, W] over the frames in mask [B, F] (all when None). Masked-out
    entries are selected away (no gradient, and a non-finite value there cannot leak into the
    mean); an empty mask gives 0."""
    w = frame_weights(mask, values)
    if w is None:
        return values.mean()
    w = w.expand_as(values)
    kept = torch.where(w > 0, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return kept.sum() / w.sum().clamp_min(1)


def flow_matching_loss(v: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean((v - (noise - x0))^2) in float32 over the frames in mask (all when None).
    v, x0, noise [B, C, F, H, W]; x0_t = add_noise(x0, noise, sigma) is what v was predicted at."""
    target = flow_target(x0.float(), noise.float())
    if mask is None:
        return torch.nn.functional.mse_loss(v.float(), target)
    return masked_mean((v.float() - target) ** 2, mask)
