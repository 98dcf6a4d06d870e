"""Noise-level draws for training (interim: merged with the FoPP sampler module)."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..models.schedule import shift_sigma

SIGMA_DISTS = ("uniform", "logit_normal")


def flow_sigmas(u: torch.Tensor, shift: float = 1.0, dist: str = "uniform") -> torch.Tensor:
    """Flow-matching training sigmas from uniforms u in [0, 1) (any shape): uniform, or
    logit-normal (sigmoid of a standard normal, SD3), then shifted."""
    if dist == "uniform":
        sigma = u
    elif dist == "logit_normal":
        sigma = torch.sigmoid(torch.special.ndtri(u.clamp(1e-6, 1 - 1e-6)))
    else:
        raise ConfigError(f"sigma_dist must be one of {SIGMA_DISTS}, got {dist!r}")
    return shift_sigma(sigma, shift)


def ar_sigmas(levels: torch.Tensor, num_levels: int, shift: float = 1.0) -> torch.Tensor:
    """Integer levels in [0, num_levels) (AR-Diffusion / FoPP) -> flow sigmas in (0, 1]:
    level l is sigma (l + 1) / num_levels (the last level is pure noise), then shifted."""
    return shift_sigma((levels.double() + 1) / num_levels, shift).float()
