"""What the Triton kernels accept: dtypes and head dims.

Plain constants, importable without triton: `dispatch.py` and `rope.py` choose a backend with
them, the Triton host modules check their inputs against them.
"""

from __future__ import annotations

import torch

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_AUTO_DTYPES = (torch.float16, torch.bfloat16)  # what the automatic choice sends there
TRITON_HEAD_DIMS = (16, 32, 64, 128)  # tl.dot needs >= 16; the fp32 accumulators fit registers
