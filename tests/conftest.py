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
    """A TCP port free on this machine now, for `accelerate launch` (fixed ports collide with
    other processes). torchrun launches use --standalone instead: its agent binds the store's
    port itself, so no other process can take the port between choosing and binding it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def toy_dit(tmp_path_factory):
    """A random one-layer toy-preset DiT checkpoint (seed 0), shared by the generation and
    weight-loading tests: read it, copy it before changing anything in it."""
    from forcelab.models import CausalDiT, DiTConfig

    path = tmp_path_factory.mktemp("toy_dit") / "toy"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CausalDiT(DiTConfig.preset("toy", num_layers=1)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """make(layers=1) -> a folder holding a random bidirectional toy DiT of the tiny test size
    (dim 32, 2 heads, chunks of 2 frames): the frozen teacher of the distillation tests."""
    from forcelab.models import CausalDiT, DiTConfig

    made = {}

    def make(layers: int = 1):
        if layers not in made:
            path = tmp_path_factory.mktemp(f"teacher{layers}") / "teacher"
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                CausalDiT(DiTConfig.preset("toy", dim=32, ffn_dim=64, num_layers=layers, num_heads=2,
                                           chunk_frames=2)).save_pretrained(path)
            made[layers] = path
        return made[layers]
    return make


@pytest.fixture
def resume_is_exact():
    """check(make_config, tmp_path, roles, *overrides): 6 steps straight == 3 steps + resume
    latest + 3 steps, bit for bit (every logged metric and the roles' final weights).
    make_config(folder, *overrides) -> a config writing to folder / "run"."""
    import json

    from safetensors.torch import load_file

    from forcelab.train.trainer import Trainer

    def metrics(folder):
        rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("time", "steps_per_s")} for r in rows]

    def weights(folder, role):
        path = folder / "run" / "checkpoint-000006" / role / "diffusion_pytorch_model.safetensors"
        return load_file(str(path))

    def check(make_config, tmp_path, roles, *overrides):
        args = ("max_steps=6", "checkpoint.every=3", *overrides)
        Trainer(make_config(tmp_path / "a", *args)).run()
        split = make_config(tmp_path / "b", *args)
        Trainer(split).run(stop_at=3)
        Trainer(split, resume="latest").run()
        a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
        assert len(a) == 6 and a == b
        for role in roles:
            wa, wb = weights(tmp_path / "a", role), weights(tmp_path / "b", role)
            assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), role
    return check
