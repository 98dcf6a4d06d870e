"""Attention kernel configs and the autotuner's bookkeeping (no GPU: the timing is faked)."""

import json

import pytest
import torch

pytest.importorskip("triton")

from forcelab.kernels.dispatch import triton_backend  # noqa: E402


@pytest.fixture()
def launch():
    """The configs module (imported after the launch module, which reads TRITON_INTERPRET)."""
    triton_backend()
    from forcelab.kernels import triton_configs
    return triton_configs


def test_every_shipped_config_is_sound(launch):
    """Default first, tiles that wgmma can use, fp32 on small tiles, both head-dim classes."""
    for kernel in ("fwd", "dkdv", "dq"):
        for head_dim in (16, 32, 64, 128):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                configs = launch.shipped_configs(kernel, head_dim, dtype)
                assert configs and len(set(configs)) == len(configs)
                for c in configs:
                    assert c.block_m >= 16 and c.block_n >= 16
                    assert c.num_warps in (4, 8) and c.num_stages >= 1
                    if dtype == torch.float32:
                        assert c.block_m * c.block_n <= 32 * 32


def test_tuner_times_once_and_persists(launch, tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv(launch.TUNING_FILE_ENV, str(path))
    configs = (launch.KernelConfig(64, 64, 4, 2), launch.KernelConfig(128, 64, 8, 3))
    fake_ms = {configs[0]: 2.0, configs[1]: 1.0}
    timed = []

    def do_bench(fn, warmup, rep):
        fn()
        return fake_ms[timed[-1]]
    import triton.testing
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    tuner = launch._Tuner()
    assert tuner.pick("key", configs, timed.append) == configs[1]
    assert timed == list(configs)
    assert tuner.pick("key", configs, timed.append) == configs[1]
    assert len(timed) == 2                                       # remembered in memory
    assert json.loads(path.read_text()) == {"key": [128, 64, 8, 3]}
    assert launch._Tuner().pick("key", configs, timed.append) == configs[1]
    assert len(timed) == 2                                       # and by a new process


def test_tuning_key_buckets_lengths(launch):
    """A filling streaming cache (every chunk a few frames longer) re-tunes only when the
    key length crosses a power of two."""
    lengths = [4680 * c for c in range(1, 8)]
    assert len({launch._bucket(n) for n in lengths}) == 3


def test_autotune_switch(launch, monkeypatch):
    monkeypatch.setenv(launch.AUTOTUNE_ENV, "0")
    assert not launch.autotune_enabled()
