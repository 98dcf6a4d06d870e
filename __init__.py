"""forcelab: train and distill causal (autoregressive, streaming) video diffusion models.

One causal DiT, one rollout engine, every recipe."""

import os as _os
import sys as _sys

__version__ = "0.1.0"


def _forget_own_folder_on_path() -> None:
    """A checkout's root is this package's own folder. Python started inside it (`python -m`,
    `python -c`, `python -m pytest`) puts that folder on sys.path, where forcelab's subpackages
    would pass for top-level modules of the same names and shadow installed distributions
    (Hugging Face's `kernels`, which transformers imports, by forcelab's `kernels/`). forcelab is
    only ever imported as `forcelab`: drop the folder from sys.path."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != here]


_forget_own_folder_on_path()
