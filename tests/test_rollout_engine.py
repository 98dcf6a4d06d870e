"""The rollout engine on a tiny random DiT: cache == recompute, passes, training hooks,
prompt switches, streaming memory, the teacher's CFG."""

import pytest
import torch
from torch import nn

from forcelab.errors import ForcelabError
from forcelab.models import CausalDiT, DiTConfig
from forcelab.models.plans import Chunkwise, Rolling, StepMatrix, Teacher
from forcelab.models.rollout import (
    Noise, Switch, Training, denoise_window, make_cache, rollout, stream)

H = W = 4                  # latent size: 4 tokens per frame with the (1, 2, 2) patch
C = DiTConfig.preset("toy").in_channels
TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = CausalDiT(DiTConfig.preset("toy")).eval()   # chunk_frames 2
    for p in m.parameters():
        p.requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 5, 32, generator=g), torch.randn(1, 7, 32, generator=g)


def noise(seeds=(0,)):
    return Noise(list(seeds), C, H, W)


class Recorder:
    """Every DiT call: (first frame, per-frame timesteps, commit, grad enabled)."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        x, t = args[0], args[1]
        self.calls.append((kwargs.get("start_frame"), t[0].tolist(), kwargs.get("commit", False),
                           torch.is_grad_enabled(), x.shape[2]))

    def close(self):
        self.handle.remove()


# ---------------------------------------------------------------------- cache correctness
PLANS = {
    "chunkwise": Chunkwise(),
    "chunkwise-context-noise": Chunkwise(context_noise=80.0),
    "chunkwise-window-sink": Chunkwise(window_frames=4, sink_frames=2),
    "rolling-window-sink": Rolling(window_frames=6, sink_frames=2),
    "step-matrix-segments": StepMatrix(ar_step=2, window_frames=4, segment_frames=6),
    "step-matrix-sync": StepMatrix(ar_step=0, block_frames=2),
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_cache_equals_recompute(model, prompts, name):
    """Generation against the KV cache == the same generation recomputing the full block-causal
    sequence at every pass (no cache), same noise."""
    plan = PLANS[name]
    frames = 12 if "segments" in name else 8
    cached = rollout(model, plan, prompts[0], noise(), frames)
    recomputed = rollout(model, plan, prompts[0], noise(), frames, recompute=True)
    assert cached.x0.shape == (1, C, frames, H, W)
    assert (cached.x0 - recomputed.x0).abs().max() < TOL


# ---------------------------------------------------------------------- the cache's dtype
# bf16 keeps 8 significant bits (a relative rounding of 2^-9 per value): 2% of the largest
# output bounds a few chunks of it. (On the torch backend autocast runs attention in bf16 and
# rounds an fp32 cache's K/V as the bf16 cache stores them: there the outputs are equal.)
BF16_TOL = 2e-2


@pytest.mark.parametrize("name", ["chunkwise-window-sink", "rolling-window-sink", "step-matrix-sync"])
def test_cache_takes_the_autocast_dtype(model, prompts, name):
    """Under bf16 autocast (weights fp32) the rollout's cache holds bf16 K/V, as the passes
    produce them, and its output matches the same rollout on an fp32 cache within bf16's
    precision, in inference and in a training rollout with gradients; without autocast the
    cache keeps the weights' dtype and the output is bit for bit that of an fp32 cache."""
    plan, frames = PLANS[name], 8

    def run(cache=None, training=None):
        return rollout(model, plan, prompts[0], noise(), frames, cache=cache, training=training)

    fp32_cache = lambda: make_cache(model, plan, 1, H, W, frames)   # noqa: E731  (outside autocast)
    plain = run()
    assert {t.dtype for t in plain.cache.k + plain.cache.v + plain.cache.sink_k} == {torch.float32}
    assert torch.equal(plain.x0, run(fp32_cache()).x0)
    with torch.enable_grad():
        for p in model.parameters():
            p.requires_grad_(True)
        try:
            for training in (None, Training(exit_step=1)):
                caches = [fp32_cache(), None]
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    high, low = (run(cache, training) for cache in caches)
                stored = low.cache.k + low.cache.v + low.cache.sink_k
                assert stored and {t.dtype for t in stored} == {torch.bfloat16}
                assert {t.dtype for t in high.cache.k} == {torch.float32}
                low_x0, high_x0 = low.x0.detach().float(), high.x0.detach().float()
                err = float((low_x0 - high_x0).abs().max() / high_x0.abs().max())
                assert err < BF16_TOL, (training, err)
                if training is not None:
                    low.x0.float().square().mean().backward()
                    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        finally:
            for p in model.parameters():
                p.requires_grad_(False)
                p.grad = None


def test_context_matters(model, prompts):
    """The equality above is not vacuous: later chunks depend on the committed context."""
    full = rollout(model, Chunkwise(), prompts[0], noise(), 8)
    own_chunk_only = rollout(model, Chunkwise(window_frames=2), prompts[0], noise(), 8)
    assert (full.x0[:, :, :2] - own_chunk_only.x0[:, :, :2]).abs().max() < TOL   # first chunk: same
    assert (full.x0[:, :, 2:] - own_chunk_only.x0[:, :, 2:]).abs().max() > 1e-2


def test_batch_rows_are_independent(model, prompts):
    both = rollout(model, Chunkwise(), prompts[0].expand(2, -1, -1), noise((0, 5)), 4)
    one = rollout(model, Chunkwise(), prompts[0], noise((5,)), 4)
    assert (both.x0[1:] - one.x0).abs().max() < TOL


# ---------------------------------------------------------------------- passes
def test_rolling_passes(model, prompts):
    plan = Rolling(context_noise=50.0)
    rec = Recorder(model)
    try:
        rollout(model, plan, prompts[0], noise(), 10)
    finally:
        rec.close()
    denoised, committed = {}, {}
    for start, ts, commit, grad, n in rec.calls:
        assert not grad
        for j in range(n):
            (committed if commit else denoised).setdefault(start + j, []).append(ts[j])
    assert sorted(denoised) == list(range(10))
    for f, ts in denoised.items():
        assert ts == pytest.approx(plan.timesteps)          # every level exactly once, in order
        assert committed[f] == [50.0]                       # one commit pass at the context noise
    assert max(n for *_, commit, _, n in rec.calls if not commit) == 2 * plan.steps   # full windows


def test_training_hooks_chunkwise(model, prompts):
    plan, exit_step = Chunkwise(), 2
    with torch.enable_grad():
        for p in model.parameters():
            p.requires_grad_(True)
        rec = Recorder(model)
        try:
            out = rollout(model, plan, prompts[0], noise(), 8, training=Training(exit_step, grad_from_frame=4))
        finally:
            rec.close()
            out.x0.square().mean().backward()
            grads = [p.grad for p in model.parameters()]
            for p in model.parameters():
                p.requires_grad_(False)
                p.grad = None
    # per chunk: steps 0..exit (the last one with grad only from frame 4 on), then the commit without
    expected = []
    for c in range(4):
        expected += [(2 * c, False, False)] * exit_step + [(2 * c, False, 2 * c >= 4), (2 * c, True, False)]
    assert [(s, commit, grad) for s, _, commit, grad, _ in rec.calls] == expected
    assert out.grad_frames.tolist() == [False] * 4 + [True] * 4
    assert out.x0[:, :, 4:].requires_grad and out.exit_timesteps == (plan.timesteps[2], plan.timesteps[3])
    assert out.timesteps.tolist() == [plan.timesteps[exit_step]] * 8
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    # the chunk leaves at its exit step: the same as inference with the list cut there
    short = rollout(model, Chunkwise(timesteps=plan.timesteps[:exit_step + 1]), prompts[0], noise(), 8)
    assert (out.x0.detach() - short.x0).abs().max() < TOL


def test_training_hooks_rolling_tile_the_video(model, prompts):
    plan = Rolling()
    S = plan.steps
    for exit_step in range(S):
        rec = Recorder(model)
        try:
            with torch.enable_grad():
                out = rollout(model, plan, prompts[0], noise(), 10, training=Training(exit_step))
        finally:
            rec.close()
        # no parameter needs grad here, so check which passes ran with grad enabled instead
        grad_passes = [(s, n) for s, _, commit, grad, n in rec.calls if grad]
        assert all(not (commit and grad) for _, _, commit, grad, _ in rec.calls)
        covered = sorted(f for s, n in grad_passes for f in range(s, s + n))
        assert covered == list(range(10))                  # gradient windows tile the video once
        assert len(out.timesteps) == 10 and set(out.timesteps.tolist()) <= set(plan.timesteps)


# ---------------------------------------------------------------------- prompt switches
@pytest.mark.parametrize("window,recache", [(None, 4), (6, None)])
def test_switch_recache_equals_fresh_run(model, prompts, window, recache):
    """After a switch, the output equals a fresh run on the new prompt whose cache holds the
    same recached frames (LongLive's recache), and differs from not switching."""
    p1, p2 = prompts
    plan = Chunkwise(window_frames=window, context_noise=40.0)
    switched = rollout(model, plan, p1, noise(), 12, switches=[Switch(6, p2, recache_frames=recache)])
    n = recache or 4                                       # window 6 - chunk 2: the frames the cache holds
    fresh = rollout(model, plan, p2, noise(), 6, start_frame=6, prefix=switched.x0[:, :, 6 - n:6])
    plain = rollout(model, plan, p1, noise(), 12)
    assert (switched.x0[:, :, :6] - plain.x0[:, :, :6]).abs().max() < TOL
    assert (switched.x0[:, :, 6:] - fresh.x0).abs().max() < TOL
    assert (switched.x0[:, :, 6:] - plain.x0[:, :, 6:]).abs().max() > 1e-2


def test_switch_flush_keep_and_rope_cut(model, prompts):
    p1, p2 = prompts
    plan = Chunkwise(window_frames=6, sink_frames=2)     # the ring keeps 6 - 2 = 4 frames, the sink 2
    keys = {}
    for mode, stored in (("flush", [0, 1, 5, 6, 7]), ("keep", [0, 1, 4, 5, 6, 7]),
                         ("recache", [0, 1, 4, 5, 6, 7])):
        cache = make_cache(model, plan, 1, H, W, 0)
        for chunk in stream(model, plan, p1, noise(), 10, cache=cache,
                            switches=[Switch(6, p2, mode=mode, rope_jump=3)]):
            if chunk.start == 6:
                break
        assert cache.stored_frames == stored, mode
        assert cache.rope_offset == 3
        assert torch.equal(cache.context_kv[0][0], model.context_kv(p2)[0][0])
        slot = cache.slot_frame.index(4) if 4 in cache.slot_frame else None
        keys[mode] = None if slot is None else cache.k[-1][:, slot * H * W // 4:(slot + 1) * H * W // 4].clone()
    # recache recomputed frame 4 under the new prompt (layer 0 keys precede cross-attention:
    # compare the last layer); keep left the old keys
    assert (keys["recache"] - keys["keep"]).abs().max() > 1e-3


# ---------------------------------------------------------------------- streaming
def test_stream_is_lazy_and_memory_is_constant(model, prompts):
    plan = Rolling(window_frames=4, sink_frames=2)
    cache = make_cache(model, plan, 1, H, W, 0)
    rec = Recorder(model)
    try:
        chunks = stream(model, plan, prompts[0], noise(), 60, cache=cache)
        first = next(chunks)
        assert first.start == 0 and first.x.shape[2] == 2
        assert len(rec.calls) == plan.steps + 1            # S passes + one commit, nothing more yet
        sizes, held = set(), []
        for chunk in chunks:
            sizes.add(cache.nbytes)
            held.append(len(cache.stored_frames))
    finally:
        rec.close()
    assert chunk.start == 58 and len(sizes) == 1 and max(held) == 2 + 4 - 2


# ---------------------------------------------------------------------- teacher
class GaussianFlow(nn.Module):
    """The exact flow for data x0 ~ N(m, 0.25) with m = context[b, 0, 0]: v is affine in m,
    so CFG with scale g is exactly the flow of m_u + g * (m_c - m_u)."""

    config = DiTConfig.preset("toy")

    def forward(self, x, t, context, chunk_frames=None):
        assert chunk_frames is None                     # the teacher is bidirectional
        sigma = t.double().view(x.shape[0], 1, -1, 1, 1) / 1000
        m = context[:, 0, 0].double().view(-1, 1, 1, 1, 1)
        a, s2 = 1 - sigma, 0.25
        x0 = m + a * s2 / (a * a * s2 + sigma * sigma) * (x.double() - a * m)
        return ((x.double() - x0) / sigma).float()


@pytest.mark.parametrize("solver,tol", [("unipc", 0.02), ("euler", 0.3)])
def test_teacher_cfg_convention(solver, tol):
    cond, uncond = torch.full((1, 1, 32), 1.0), torch.full((1, 1, 32), -0.5)
    plan = Teacher(steps=30, shift=3.0, solver=solver, guidance=2.0)
    out = rollout(GaussianFlow(), plan, cond, noise(), 3, negative=uncond).x0
    m = -0.5 + 2.0 * (1.0 - -0.5)                       # uncond + guidance * (cond - uncond) = 2.5
    x1, s1 = noise()(0, 3), float(plan.timesteps[0]) / 1000
    exact = m + 0.5 * (x1 - (1 - s1) * m) / ((1 - s1) ** 2 * 0.25 + s1 ** 2) ** 0.5
    assert (out - exact).abs().max() < tol
    assert (out.mean() - m).abs() < 0.2


def test_denoise_window_cfg_on_the_dit(model, prompts):
    p1, p2 = prompts
    x = noise()(0, 4)
    sigma = torch.tensor([[0.9, 0.9, 0.5, 0.5]])
    v, x0 = denoise_window(model, x, sigma, p1, uncond=p2, guidance=3.0)
    v_c = model(x, sigma * 1000, p1)
    v_u = model(x, sigma * 1000, p2)
    assert (v - (v_u + 3.0 * (v_c - v_u))).abs().max() < 1e-4
    assert (x0 - (x - sigma.view(1, 1, 4, 1, 1) * v)).abs().max() < 1e-5
    # a per-sample level [B] applies to every frame of that sample
    x2 = noise((0, 1))(0, 3)
    v2, _ = denoise_window(model, x2, torch.tensor([0.9, 0.2]), p1.expand(2, -1, -1))
    ref = model(x2, torch.tensor([[900.0] * 3, [200.0] * 3]), p1.expand(2, -1, -1))
    assert (v2 - ref).abs().max() < 1e-5
    with pytest.raises(ValueError, match="does not fit"):
        denoise_window(model, x2, torch.ones(3, 3), p1)


# ---------------------------------------------------------------------- errors
def test_bad_requests_are_clear_errors(model, prompts):
    p1, p2 = prompts
    with pytest.raises(ForcelabError, match="multiple of 2"):
        rollout(model, Chunkwise(), p1, noise(), 7)
    with pytest.raises(ForcelabError, match="chunk boundary"):
        rollout(model, Chunkwise(), p1, noise(), 8, switches=[Switch(3, p2)])
    with pytest.raises(ForcelabError, match="outside"):
        rollout(model, Chunkwise(), p1, noise(), 8, switches=[Switch(8, p2)])
    with pytest.raises(ForcelabError, match="sink needs a window"):
        rollout(model, Chunkwise(sink_frames=2), p1, noise(), 8)
    with pytest.raises(ForcelabError, match="multiple of chunk_frames"):
        rollout(model, Chunkwise(window_frames=3), p1, noise(), 8)
    with pytest.raises(ForcelabError, match="negative prompt"):
        rollout(model, Teacher(steps=2, guidance=3.0), p1, noise(), 4)
    with pytest.raises(ForcelabError, match="no cache, prefix or prompt switches"):
        rollout(model, Teacher(steps=2, guidance=1.0), p1, noise(), 4, switches=[Switch(2, p2)])
    with pytest.raises(ForcelabError, match="recompute reference"):
        rollout(model, Chunkwise(), p1, noise(), 8, switches=[Switch(4, p2)], recompute=True)
    with pytest.raises(ForcelabError, match="mode"):
        Switch(4, p2, mode="reset")
