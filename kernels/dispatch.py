"""The one attention entry point: picks a backend for a layout."""

from __future__ import annotations

import torch

from .layout import AttentionLayout
from .reference import attention_reference

BACKENDS = ("torch",)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout,
              backend: str | None = None) -> torch.Tensor:
    """Scaled dot-product attention under `layout`. q [B, Lq, H, D], k/v [B, Lk, H, D].

    backend: None (automatic), or one of BACKENDS."""
    if q.shape[1] != layout.num_queries or k.shape[1] != layout.num_keys:
        raise ValueError(
            f"attention: q has {q.shape[1]} tokens and k has {k.shape[1]}, but the layout "
            f"describes {layout.num_queries} queries and {layout.num_keys} keys")
    if backend is None:
        backend = "torch"
    if backend == "torch":
        return attention_reference(q, k, v, layout)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
