"""3D rotary position angles for the DiT (Wan2.1's split of the head dim).

A token at (frame position p, row i, col j) is rotated by cat(ang_t(p), ang_h(i), ang_w(j)),
ang_axis(n) = n / theta ** (arange(0, d_axis, 2) / d_axis), computed in float64 as Wan does.
Angles are computed from positions on the fly (not looked up in a fixed table), so
streaming can rotate cached keys by window-relative positions of any value. Tables are
memoised per (positions, grid, device): a stream in steady state re-bases to the same
positions every chunk, so each denoising step reuses them.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .config import DiTConfig

TABLE_CACHE_SIZE = 16  # distinct (positions, grid, device) tables kept


def _inv_freq(axis_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / torch.pow(theta, torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)


@lru_cache(maxsize=TABLE_CACHE_SIZE)
def _tables(axis_dims: tuple[int, int, int], theta: float, positions: tuple[int, ...], height: int,
            width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    dt, dh, dw = axis_dims
    pos = torch.tensor(positions, dtype=torch.float64)
    ang_t = torch.outer(pos, _inv_freq(dt, theta))
    ang_h = torch.outer(torch.arange(height, dtype=torch.float64), _inv_freq(dh, theta))
    ang_w = torch.outer(torch.arange(width, dtype=torch.float64), _inv_freq(dw, theta))
    n = len(positions)
    ang = torch.cat([
        ang_t[:, None, None, :].expand(n, height, width, -1),
        ang_h[None, :, None, :].expand(n, height, width, -1),
        ang_w[None, None, :, :].expand(n, height, width, -1),
    ], dim=-1).reshape(n * height * width, (dt + dh + dw) // 2)
    return ang.cos().float().to(device), ang.sin().float().to(device)


def rope_tables(config: DiTConfig, frame_positions, height: int, width: int,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n * height * width, head_dim / 2] (fp32) for frames at `frame_positions`.

    frame_positions: n integer temporal positions (may be negative: re-based windows);
    height, width: the token grid of one frame. Token order is (frame, row, col).
    The returned tensors are shared (memoised): do not modify them in place."""
    positions = tuple(int(p) for p in torch.as_tensor(frame_positions).reshape(-1).tolist())
    return _tables(config.rope_axis_dims, float(config.rope_theta), positions, height, width,
                   torch.device(device) if device is not None else torch.device("cpu"))
