"""Gradient checkpointing against the KV cache: a block recomputed in backward sees exactly
the keys and values its forward saw, although later passes of the same rollout have written
the cache since (a window's ring evicts, the staging slots take every pass's keys, a moving
sink is rotated afresh, a recache clears and rewrites).

Reference: the same rollout without checkpointing (nothing is recomputed there). Every plan
(chunk-wise, rolling, step matrix), every cache mode (full, window, window + sink,
adjacent-sink RoPE, recache after a prompt switch) and every exit step."""

import pytest
import torch

from forcelab.models import CausalDiT, DiTConfig
from forcelab.models.plans import Chunkwise, Rolling, StepMatrix
from forcelab.models.rollout import Noise, Switch, Training, rollout

B, H, W = 2, 4, 4
STEPS = [1000.0, 750.0, 500.0]


def toy_model(sink_rope="true_distance"):
    torch.manual_seed(0)
    cfg = DiTConfig.preset("toy", dim=32, ffn_dim=64, num_layers=2, num_heads=2, chunk_frames=2,
                           sink_rope=sink_rope)
    return CausalDiT(cfg)


def gradients(model, plan, frames, exit_step, checkpointing, switches=()):
    """d(sum(w * x0)) / d(parameters) for one training rollout, w a fixed random weighting."""
    model.gradient_checkpointing = checkpointing
    gen = torch.Generator().manual_seed(1)
    context = torch.randn(B, 4, model.config.text_dim, generator=gen)
    noise = Noise([3, 4], model.config.in_channels, H, W)
    res = rollout(model, plan, context, noise, frames, training=Training(exit_step), switches=switches)
    weight = torch.randn(res.x0.shape, generator=gen)
    loss = (res.x0 * weight).sum()
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])


def assert_same_gradients(model, plan, frames, exit_step, switches=()):
    plain = gradients(model, plan, frames, exit_step, False, switches)
    recomputed = gradients(model, plan, frames, exit_step, True, switches)
    assert plain.abs().max() > 0
    err = ((recomputed - plain).abs().max() / plain.abs().max()).item()
    assert err <= 1e-6, f"gradients with checkpointing differ by {err:.3g} (relative)"


CACHES = {                     # (window_frames, sink_frames, sink_rope); window 0 = none (full cache)
    "full": (0, 0, "true_distance"),
    "window": (4, 0, "true_distance"),
    "window+sink": (4, 2, "true_distance"),
    "adjacent-sink": (4, 2, "adjacent"),
}


@pytest.mark.parametrize("cache", sorted(CACHES))
@pytest.mark.parametrize("exit_step", range(len(STEPS)))
def test_chunkwise_gradients_are_the_same_with_checkpointing(cache, exit_step):
    window, sink, sink_rope = CACHES[cache]
    plan = Chunkwise(timesteps=STEPS, window_frames=window, sink_frames=sink)
    assert_same_gradients(toy_model(sink_rope), plan, 10, exit_step)


@pytest.mark.parametrize("cache", ["window", "window+sink", "adjacent-sink"])
@pytest.mark.parametrize("exit_step", range(len(STEPS)))
def test_rolling_gradients_are_the_same_with_checkpointing(cache, exit_step):
    window, sink, sink_rope = CACHES[cache]
    plan = Rolling(timesteps=STEPS, window_frames=window + 2, sink_frames=sink)
    assert_same_gradients(toy_model(sink_rope), plan, 12, exit_step)


@pytest.mark.parametrize("exit_step", range(len(STEPS)))
def test_step_matrix_gradients_are_the_same_with_checkpointing(exit_step):
    plan = StepMatrix(timesteps=STEPS, window_frames=4, sink_frames=2, ar_step=1, update="renoise")
    assert_same_gradients(toy_model(), plan, 10, exit_step)


# every cache policy besides sink_window (models/cache_policy.py); the toy model has 2 heads, so
# dummy_heads gives half of them a short context
POLICIES = ["deep_forcing", "dummy_heads:fraction=0.5", "temporal_merge", "similar_merge:recent=1"]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", ["chunkwise", "rolling"])
@pytest.mark.parametrize("exit_step", [0, len(STEPS) - 1])
def test_cache_policy_gradients_are_the_same_with_checkpointing(policy, kind, exit_step):
    """A policy merges slots (writes over cached K/V), evicts by attention statistics or gives
    heads their own context: the recomputed pass must still see what its forward saw."""
    plan = (Chunkwise if kind == "chunkwise" else Rolling)(timesteps=STEPS, window_frames=6, sink_frames=2,
                                                            cache_policy=policy)
    assert_same_gradients(toy_model(), plan, 14, exit_step)


@pytest.mark.parametrize("mode", ["recache", "flush"])
@pytest.mark.parametrize("exit_step", [0, len(STEPS) - 1])
def test_prompt_switch_gradients_are_the_same_with_checkpointing(mode, exit_step):
    """A switch mid-rollout clears the cache and (recache) writes the last frames again with the
    new prompt, over slots that earlier gradient passes read."""
    model = toy_model()
    context = torch.randn(B, 4, model.config.text_dim, generator=torch.Generator().manual_seed(5))
    plan = Chunkwise(timesteps=STEPS, window_frames=4, sink_frames=2)
    assert_same_gradients(model, plan, 10, exit_step, switches=[Switch(6, context, mode=mode)])


def test_windowed_checkpointing_is_not_trivially_equal():
    """The comparison above can fail: recomputing against the cache as it is AFTER the rollout
    (what a checkpointed block did before reads were kept) changes the gradient."""
    model = toy_model()
    plan = Chunkwise(timesteps=STEPS, window_frames=4, sink_frames=2)
    plain = gradients(model, plan, 10, 1, False)
    from forcelab.models import kv_cache

    original = kv_cache.KVCache.read

    def stale_read(self, *args, recomputable=False, **kwargs):   # views, never kept valid
        return original(self, *args, recomputable=False, **kwargs)

    kv_cache.KVCache.read = stale_read
    try:
        stale = gradients(model, plan, 10, 1, True)
    finally:
        kv_cache.KVCache.read = original
    assert ((stale - plain).abs().max() / plain.abs().max()).item() > 1e-3


def test_a_read_survives_the_ring_overwriting_it_and_a_growing_cache_copies_nothing():
    """CachedKV: views of the store until the cache writes over them, then private copies of
    what was read; a cache that only grows never copies (no memory cost without a window)."""
    model = toy_model()
    cfg = model.config
    S = cfg.tokens_per_frame(H, W)

    def commit(cache, frame):
        x = torch.randn(B, cfg.in_channels, 2, H, W, generator=torch.Generator().manual_seed(frame))
        with torch.no_grad():
            model.set_prompt(cache, torch.zeros(B, 4, cfg.text_dim))
            model(x, torch.zeros(B), cache=cache, start_frame=frame, commit=True)

    ring = model.new_cache(B, H, W, chunk_frames=2, window_frames=4, sink_frames=0)
    commit(ring, 0)
    past = ring.read(0, 2 * S, recomputable=True)
    before_k, before_v = past.k.clone(), past.v.clone()
    assert past.k.data_ptr() == ring.k[0].data_ptr()              # a view while nothing changed
    commit(ring, 2)                                               # the ring holds 2 frames: evicts 0-1
    assert ring.stored_frames == [2, 3]
    assert torch.equal(past.k, before_k) and torch.equal(past.v, before_v)
    assert past.k.data_ptr() != ring.k[0].data_ptr()

    full = model.new_cache(B, H, W, chunk_frames=2, window_frames=None, max_frames=8)
    commit(full, 0)
    past = full.read(1, 2 * S, recomputable=True)
    for frame in (2, 4, 6):
        commit(full, frame)
    assert past.k.data_ptr() == full.k[1].data_ptr() and past.v.data_ptr() == full.v[1].data_ptr()


@pytest.mark.parametrize("plan", [Chunkwise(timesteps=STEPS, window_frames=4, sink_frames=2),
                                  Rolling(timesteps=STEPS, window_frames=4, sink_frames=2)], ids=["chunkwise", "rolling"])
def test_skipping_the_last_commit_changes_no_output_or_gradient_and_saves_its_pass(plan):
    """A training rollout whose cache is thrown away (Self-Forcing) skips the last units' commit
    pass: one fewer DiT forward, the same x0 and the same gradients, bit for bit."""
    model = toy_model()
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))

    def run(commit_last):
        calls.clear()
        gen = torch.Generator().manual_seed(1)
        context = torch.randn(B, 4, model.config.text_dim, generator=gen)
        noise = Noise([3, 4], model.config.in_channels, H, W)
        res = rollout(model, plan, context, noise, 8, training=Training(1, commit_last=commit_last))
        loss = (res.x0 * torch.randn(res.x0.shape, generator=gen)).sum()
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        return res.x0.detach(), grads, len(calls)

    x_all, g_all, n_all = run(True)
    x_skip, g_skip, n_skip = run(False)
    hook.remove()
    assert n_skip == n_all - 1
    assert torch.equal(x_all, x_skip)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g_all, g_skip))
