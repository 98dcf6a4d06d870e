"""Weight dtype names accepted everywhere (CLI flags, configs, loaders) and their torch dtypes.

Its own module, apart from config.py: generation and loading need the names without the
config machinery (omegaconf, YAML) that only training and distillation use.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
DTYPE_NAMES = (*DTYPES, *_DTYPE_ALIASES)    # what parse_dtype accepts


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """"bf16" / "fp16" / "fp32" (or the torch names, or a torch.dtype) -> torch.dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]
