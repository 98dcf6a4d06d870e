"""Fault injection: the public model API (CausalDiT, KVCache, from_pretrained/save_pretrained).

Every bad call raises ForcelabError with one line naming the argument, before any
computation - never a NaN output, a reshape error or a model with no blocks.
"""

import math

import pytest
import torch

from forcelab.errors import ForcelabError
from forcelab.models import CausalDiT, DiTConfig
from forcelab.models.kv_cache import KVCache
from forcelab.models.plans import Chunkwise


@pytest.fixture(scope="module")
def model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CausalDiT(DiTConfig.preset("toy", num_layers=1)).eval()


C = DiTConfig.preset("toy").in_channels


def x(b=1, f=2, h=4, w=4):
    return torch.randn(b, C, f, h, w)


def ctx(b=1, n=4):
    return torch.randn(b, n, 32)


def raises(match, fn, *args, **kwargs):
    with pytest.raises(ForcelabError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert match in msg and "\n" not in msg, msg


@pytest.mark.parametrize("t", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_timesteps_are_refused(model, t):
    """Python-number timesteps are checked by the model; a tensor's values are not read there
    (a device synchronisation per forward on a GPU): the engine's plans check theirs."""
    raises("timestep has NaN or infinite values", model, x(), t, ctx())
    raises("timestep has NaN or infinite values", model, x(), [[0.0, t]], ctx())
    with pytest.raises(ForcelabError, match="strictly decreasing"):
        Chunkwise(timesteps=[1000.0, t])


def test_python_number_and_integer_timesteps_work(model):
    with torch.no_grad():
        a = model(x(), 500.0, ctx())
        b = model(x(), torch.tensor([500]), ctx())
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


def test_batch_against_a_cache_made_for_another_batch(model):
    cache = model.new_cache(1, 4, 4, window_frames=4)
    model.set_prompt(cache, ctx())
    raises("a batch of 3 against a KV cache made for batch 1", model, x(3), torch.zeros(3), cache=cache, commit=True)
    raises("a prompt batch of 3 for a cache made for batch 1", model.set_prompt, cache, ctx(3))
    raises("a batch of 3 against a KV cache made for batch 1", model, x(3), torch.zeros(3), ctx(3), cache=cache)


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size=0), "batch_size must be a whole number >= 1, got 0"),
    (dict(batch_size=-2), "batch_size must be a whole number >= 1"),
    (dict(chunk_frames=0), "chunk_frames must be a whole number >= 1"),
    (dict(window_frames=-1), "window_frames (None: no window) must be"),
    (dict(window_frames=None, max_frames=0), "max_frames must be a whole number >= 1"),
    (dict(sink_frames=-1), "sink_frames must be a whole number >= 0"),
    (dict(batch_size=1.5), "batch_size must be a whole number"),
    (dict(sink_rope="near"), "sink_rope must be one of"),
])
def test_bad_cache_arguments(model, kwargs, match):
    args = dict(batch_size=1, chunk_frames=2, window_frames=4, sink_frames=0, max_frames=None)
    args.update(kwargs)
    raises(match, model.new_cache, args.pop("batch_size"), 4, 4, **args)


def test_kv_cache_constructor_checks_numbers_directly():
    raises("KVCache: batch_size must be", KVCache, num_layers=1, batch_size=0, tokens_per_frame=4, num_heads=1,
           head_dim=8, chunk_frames=1, window_frames=2, sink_frames=0, max_frames=None, sink_rope="true_distance",
           dtype=torch.float32)


@pytest.mark.parametrize("case", ["channels", "rank", "patch", "timestep-shape", "context-width",
                                  "context-too-long", "no-context", "too-many-frames"])
def test_bad_shapes_are_named(model, case):
    big = model.config.rope_max_len + 1
    calls = {
        "channels": ((torch.randn(1, 16, 2, 4, 4), torch.zeros(1), ctx()), f"x must be [B, {C}, F, H, W]"),
        "rank": ((torch.randn(48, 2, 4, 4), torch.zeros(1), ctx()), f"x must be [B, {C}, F, H, W]"),
        "patch": ((x(h=5), torch.zeros(1), ctx()), "multiples of the patch size"),
        "timestep-shape": ((x(), torch.zeros(2), ctx()), "timestep must be [B]=1"),
        "context-width": ((x(), torch.zeros(1), torch.randn(1, 4, 8)), "context must be [B, L, 32]"),
        "context-too-long": ((x(), torch.zeros(1), ctx(n=17)), "more than text_len=16"),
        "no-context": ((x(), torch.zeros(1)), "context is required without a cache"),
        "too-many-frames": ((torch.zeros(1, C, big, 2, 2), torch.zeros(1), ctx()), "exceed rope_max_len"),
    }
    args, match = calls[case]
    with torch.no_grad():
        raises(match, model, *args)


@pytest.mark.parametrize("changes,match", [
    (dict(num_heads=0), "num_heads must be a whole number >= 1"),
    (dict(num_layers=-1), "num_layers must be a whole number >= 1"),
    (dict(num_layers=0), "num_layers must be a whole number >= 1"),
    (dict(in_channels=0), "in_channels must be"),
])
def test_a_model_cannot_be_built_from_impossible_numbers(changes, match):
    raises(match, lambda: CausalDiT(DiTConfig.preset("toy", **changes)))


def test_from_pretrained_errors(tmp_path, model):
    raises("checkpoint directory not found", CausalDiT.from_pretrained, tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    raises("a file; give the checkpoint directory", CausalDiT.from_pretrained, tmp_path / "file")
    path = model.save_pretrained(tmp_path / "ckpt")
    raises("num_layers must be a whole number >= 1", CausalDiT.from_pretrained, path, num_layers=0)
    raises("checkpoint does not match the model config", CausalDiT.from_pretrained, path,
           config=DiTConfig.preset("toy", num_layers=2))


def test_save_pretrained_bad_format(tmp_path, model):
    raises("unknown checkpoint format 'onnx'", model.save_pretrained, tmp_path / "c", format="onnx")
    assert not (tmp_path / "c").exists() and not any(tmp_path.iterdir())


def test_valid_edge_cases_still_work(model):
    """Documented valid behaviour: timestep 0 and 1000, a batch-B cache with batch-B prompts."""
    cache = model.new_cache(2, 4, 4, window_frames=4)
    model.set_prompt(cache, ctx(2))
    with torch.no_grad():
        out = model(x(2), torch.tensor([0.0, 1000.0]), cache=cache, commit=True)
    assert out.shape == (2, C, 2, 4, 4) and math.isfinite(out.abs().sum().item())
