"""Shared test settings (tests/ is not a package; pytest runs in importlib mode)."""

import torch

# The suite runs tiny models on 2 CPU cores: one intra-op thread per process avoids the
# contention that makes small ops 10x slower (and DataLoader workers use one anyway).
torch.set_num_threads(1)

import os  # noqa: E402

# Compiled GPU runs of the suite take each kernel's default config: timing every candidate
# (and compiling it) belongs to benchmarks, not tests.
os.environ.setdefault("FORCELAB_ATTENTION_AUTOTUNE", "0")

import socket  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def free_port() -> int:
    """A TCP port free on this machine now, for a 2-process (gloo) launch: fixed ports collide
    with other processes on a shared machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
