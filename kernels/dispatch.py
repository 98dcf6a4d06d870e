"""The one attention entry point: picks a backend for a layout.

Backends:
- "torch": SDPA; runs anywhere. A masked layout runs as one unmasked SDPA call per group of
  query frames that see the same keys (`grouped.attention_grouped`: no [Lq, Lk] mask) when
  `grouped.use_groups` says that is faster, else as one call with the layout's dense boolean
  mask (`attention_reference`, also the reference the kernels are tested against).
- "triton": the block-sparse kernels of `triton_attention.py`. On CUDA tensors they are
  compiled; on CPU tensors they need Triton's interpreter, i.e. TRITON_INTERPRET=1 in the
  environment before the Triton modules are first imported. Those modules are imported
  here lazily, on the first call that needs them (never by `import forcelab.kernels`), so
  setting the variable at the top of a test file, or in the shell, is early enough even
  when another module has already imported forcelab.kernels, or triton itself (see
  `triton_launch.interpret_triton_library`). Once forcelab's Triton modules are imported,
  the mode is fixed for the process (`triton_launch.INTERPRETED`).
- None: automatic. Dense layouts (every key visible: a streaming chunk against a full
  window) go to SDPA without a mask, i.e. the best dense kernel torch has on the device
  (flash / cuDNN / memory-efficient on a GPU), and build no visit tables. Masked layouts go
  to "triton" for CUDA tensors when triton is installed (Linux) and the kernels serve the
  dtype and head dim well (TRITON_AUTO_DTYPES: 16-bit; fp32 "ieee" dots do not use tensor
  cores, SDPA does better there; TRITON_HEAD_DIMS), "torch" otherwise.
An explicit backend is always honoured ("triton" runs the kernels on dense layouts too).
"""

from __future__ import annotations

import importlib.util

import torch

from .grouped import attention_grouped, use_groups
from .layout import AttentionLayout
from .reference import attention_reference
from .triton_limits import TRITON_AUTO_DTYPES, TRITON_HEAD_DIMS

BACKENDS = ("torch", "triton")


def triton_installed() -> bool:
    """True when the triton package can be imported (it is a Linux-only dependency)."""
    return importlib.util.find_spec("triton") is not None


def triton_backend():
    """The host-side Triton module, imported on first use (see the module docstring)."""
    if not triton_installed():
        raise ValueError("backend 'triton' needs the triton package, which is installed on "
                         "Linux only; use backend='torch' (or None) here")
    from . import triton_launch
    return triton_launch


def resolve_backend(backend: str | None, x: torch.Tensor, what: str,
                    triton_supports: bool = True) -> str:
    """The backend that will run `what` on tensors like x: "torch" or "triton".

    triton_supports: whether the kernels handle these inputs (dtype, head dim); automatic
    choice falls back to torch when not, an explicit "triton" reports the problem later."""
    if backend is None:
        return "triton" if x.is_cuda and triton_supports and triton_installed() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown {what} backend {backend!r}; choose None or one of {BACKENDS}")
    if backend == "triton" and not triton_backend().INTERPRETED and not x.is_cuda:
        raise ValueError(
            f"{what} backend 'triton' got CPU tensors, but the Triton kernels were compiled for "
            f"a GPU: set TRITON_INTERPRET=1 in the environment before forcelab's Triton "
            f"modules are first imported (the first triton call) to run them on the CPU "
            f"interpreter, or use backend='torch'")
    return backend


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout) -> None:
    """Shapes, dtypes and devices every backend needs; the error names the culprit."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise ValueError(f"attention: {name} must be [B, L, H, D], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the "
                         f"same shape")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on "
                         f"batch, heads and head dim ([B, L, H, D])")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v devices differ ({q.device}, {k.device}, "
                         f"{v.device})")
    if q.shape[1] != layout.num_queries or k.shape[1] != layout.num_keys:
        raise ValueError(
            f"attention: q has {q.shape[1]} tokens and k has {k.shape[1]}, but the layout "
            f"describes {layout.num_queries} queries and {layout.num_keys} keys")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout,
              backend: str | None = None) -> torch.Tensor:
    """Scaled dot-product attention under `layout`. q [B, Lq, H, D], k/v [B, Lk, H, D]
    -> [B, Lq, H, D]; scale 1/sqrt(D); a query with no visible key gets 0.

    backend: None (automatic), or one of BACKENDS (see the module docstring)."""
    check_qkv(q, k, v, layout)
    if backend is None and layout.is_dense():
        return attention_reference(q, k, v, layout)  # SDPA, no mask, no tables
    supported = q.dtype in TRITON_AUTO_DTYPES and q.shape[-1] in TRITON_HEAD_DIMS
    if resolve_backend(backend, q, "attention", supported) == "triton":
        return triton_backend().triton_attention(q, k, v, layout)
    if use_groups(layout, q):
        return attention_grouped(q, k, v, layout)
    return attention_reference(q, k, v, layout)
