"""3D rotary position angles for the DiT (Wan2.1's split of the head dim).

A token at (frame position p, row i, col j) is rotated by cat(ang_t(p), ang_h(i), ang_w(j)),
ang_axis(n) = n / theta ** (arange(0, d_axis, 2) / d_axis), computed in float64 as Wan does.
Angles are computed from positions on the fly (not looked up in a fixed table), so a
stream can rotate keys at positions of any value. The row / column part is built once per
grid and device; the temporal part (a few values per frame) per set of positions, and the
two are joined on the device. Tables are memoised per (positions, grid, device): every
denoising pass of a chunk reuses its tables.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .config import DiTConfig

TABLE_CACHE_SIZE = 16  # distinct (positions, grid, device) tables kept


def _inv_freq(axis_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / torch.pow(theta, torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)


def _cos_sin(angles: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 angles -> fp32 cos, sin on device (a small pinned, non-blocking copy on a GPU:
    no host sync per streaming chunk)."""
    cos, sin = angles.cos().float(), angles.sin().float()
    if device.type == "cuda":
        return cos.pin_memory().to(device, non_blocking=True), sin.pin_memory().to(device, non_blocking=True)
    return cos.to(device), sin.to(device)


@lru_cache(maxsize=TABLE_CACHE_SIZE)
def _spatial(axis_dims: tuple[int, int, int], theta: float, height: int, width: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [height * width, (dh + dw) / 2]: the row and column part, built once per grid."""
    _, dh, dw = axis_dims
    ang_h = torch.outer(torch.arange(height, dtype=torch.float64), _inv_freq(dh, theta))
    ang_w = torch.outer(torch.arange(width, dtype=torch.float64), _inv_freq(dw, theta))
    ang = torch.cat([ang_h[:, None, :].expand(height, width, -1),
                     ang_w[None, :, :].expand(height, width, -1)], dim=-1)
    return _cos_sin(ang.reshape(height * width, (dh + dw) // 2), device)


@lru_cache(maxsize=TABLE_CACHE_SIZE)
def _tables(axis_dims: tuple[int, int, int], theta: float, positions: tuple[int, ...], height: int,
            width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    dt = axis_dims[0]
    n, hw = len(positions), height * width
    cos_t, sin_t = _cos_sin(torch.outer(torch.tensor(positions, dtype=torch.float64),
                                        _inv_freq(dt, theta)), device)
    cos_s, sin_s = _spatial(axis_dims, theta, height, width, device)

    def table(t, s):  # cos of cat(angles) = cat(cos of each axis' angles)
        return torch.cat([t[:, None, :].expand(n, hw, -1), s[None].expand(n, hw, -1)],
                         dim=-1).reshape(n * hw, -1)
    return table(cos_t, cos_s), table(sin_t, sin_s)


def rope_tables(config: DiTConfig, frame_positions, height: int, width: int,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n * height * width, head_dim / 2] (fp32) for frames at `frame_positions`.

    frame_positions: n integer temporal positions (any integers);
    height, width: the token grid of one frame. Token order is (frame, row, col).
    The returned tensors are shared (memoised): do not modify them in place."""
    if isinstance(frame_positions, torch.Tensor):
        frame_positions = frame_positions.reshape(-1).tolist()
    positions = tuple(int(p) for p in frame_positions)
    return _tables(config.rope_axis_dims, float(config.rope_theta), positions, height, width,
                   torch.device(device) if device is not None else torch.device("cpu"))
