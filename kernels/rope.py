"""QK RMSNorm (full width) and rotary position embedding: the torch reference.

Wan2.1 normalises q and k over the FULL width (all heads together), in fp32, times a weight,
then rotates adjacent pairs (x[2i], x[2i+1]) as complex numbers by per-token angles.
Angles come as cos/sin tables [L, D/2] (one entry per token and complex pair), built by
`forcelab.models.rope` from each token's (frame, row, column) position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import resolve_backend
from .triton_limits import TRITON_DTYPES


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., C] -> x / rms(x) * weight: normalised in fp32 (torch's one-kernel RMSNorm),
    returned in x's dtype, then scaled by weight (Wan's order)."""
    y = F.rms_norm(x.float(), x.shape[-1:], eps=eps)
    return (y if y.dtype == x.dtype else y.to(x.dtype)) * weight


def _rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """cos + i sin as a complex64 [L, D/2] table; memoised for the rope tables (shared,
    read-only: models/rope.py returns the same tensors for every pass of a chunk)."""
    key = (id(cos), id(sin))
    hit = _ROTATIONS.get(key)
    if hit is not None and hit[0] is cos and hit[1] is sin:
        return hit[2]
    rot = torch.complex(cos.float(), sin.float())
    if not (cos.requires_grad or sin.requires_grad):
        if len(_ROTATIONS) >= ROTATIONS_KEPT:
            _ROTATIONS.pop(next(iter(_ROTATIONS)))
        _ROTATIONS[key] = (cos, sin, rot)    # the tables are kept alive with their entry
    return rot


ROTATIONS_KEPT = 4         # complex tables memoised: a pass uses 1-2 (its frames', a moving sink's)
_ROTATIONS: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D]; cos, sin [L, D/2] -> x rotated pairwise, in x's dtype (math in fp32)."""
    # (x0 + i x1) * (cos + i sin): one complex multiply is ~3x faster than four real ones
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    out = torch.view_as_real(xc * _rotation(cos, sin)[None, :, None, :]).flatten(-2)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def qk_norm_rope_reference(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, eps: float, num_heads: int) -> torch.Tensor:
    """x [B, L, H*D] -> RMSNorm over H*D, split heads, rotate: [B, L, H, D]."""
    y = rms_norm(x, weight, eps).unflatten(-1, (num_heads, -1))
    return apply_rope(y, cos, sin)


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 eps: float, num_heads: int, backend: str | None = None) -> torch.Tensor:
    """Fused entry point used by the DiT: x [B, L, H*D] -> [B, L, H, D].

    backend as in `attention`: None (Triton on CUDA when installed, else torch), "torch" (the
    reference above), or "triton" (the fused kernel of `triton_rope.py`)."""
    supported = x.dtype in TRITON_DTYPES and weight.dtype in TRITON_DTYPES
    if resolve_backend(backend, x, "qk_norm_rope", supported) == "triton":
        from .triton_rope_launch import triton_qk_norm_rope
        return triton_qk_norm_rope(x, weight, cos, sin, eps, num_heads)
    return qk_norm_rope_reference(x, weight, cos, sin, eps, num_heads)
