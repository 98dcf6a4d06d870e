"""Shared test settings (tests/ is not a package; pytest runs in importlib mode)."""

import torch

# The suite runs tiny models on 2 CPU cores: one intra-op thread per process avoids the
# contention that makes small ops 10x slower (and DataLoader workers use one anyway).
torch.set_num_threads(1)
