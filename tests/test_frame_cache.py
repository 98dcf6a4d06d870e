"""The recompute reference (`FrameCache`, rollout(..., recompute=True)) is what a cache-less
model does, and nothing more: one DiT forward per denoising pass over the visible committed
frames + the chunk being denoised, no forward for a commit (there is no cache to write).
Counted with a forward hook; its output equals a plain cache-less chunk-by-chunk sampler
written without forcelab's rollout (tests/plain_recipes/self_forcing.py student_rollout)."""

import pytest
import torch

from forcelab.models import CausalDiT, DiTConfig
from forcelab.models.plans import Chunkwise
from forcelab.models.rollout import Noise, rollout
from plain_recipes import self_forcing as ref

H = W = 4                                   # latent size: 4 tokens per frame with the (1, 2, 2) patch
CHUNK = 2                                   # the toy preset's chunk_frames
FRAMES = 8                                  # 4 chunks
STEPS = [1000, 750, 500, 250]               # the default 4-step list before the shift-5 warp
TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = CausalDiT(DiTConfig.preset("toy")).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    assert m.config.chunk_frames == CHUNK
    return m


@pytest.fixture(scope="module")
def prompt():
    return torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))


class ForwardCount:
    """Counts the DiT's forward calls and the frames each one saw."""

    def __init__(self, model):
        self.frames = []
        self.handle = model.register_forward_pre_hook(lambda module, args: self.frames.append(args[0].shape[2]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def noise(model):
    return Noise([0], model.config.in_channels, H, W)


CASES = {                                   # plan options -> the plain sampler's settings
    "full context": (dict(window_frames=0), dict(window=None, sink=0)),
    "context noise": (dict(window_frames=0, context_noise=80.0), dict(window=None, sink=0, context_noise=80.0)),
    "window + sink": (dict(window_frames=4, sink_frames=2), dict(window=4, sink=2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_recompute_is_one_forward_per_pass(model, prompt, case):
    """Chunk k's pass sees its k committed chunks + itself: chunks x steps forwards, no commit pass."""
    plan_kw, _ = CASES[case]
    plan = Chunkwise(**plan_kw)
    with torch.no_grad(), ForwardCount(model) as count:
        rollout(model, plan, prompt, noise(model), FRAMES, recompute=True)
    chunks, steps = FRAMES // CHUNK, len(STEPS)
    assert len(plan.timesteps) == steps
    assert count.frames == [CHUNK * (k + 1) for k in range(chunks) for _ in range(steps)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_recompute_equals_plain_cacheless_sampler(model, prompt, case):
    """Same output as the plain sampler (re-noise between steps, commit at context noise),
    with the same forwards."""
    plan_kw, ref_kw = CASES[case]
    s = ref.Settings(chunk=CHUNK, steps=STEPS, **ref_kw)
    with torch.no_grad(), ForwardCount(model) as ours:
        got = rollout(model, Chunkwise(**plan_kw), prompt, noise(model), FRAMES, recompute=True).x0
    with torch.no_grad(), ForwardCount(model) as plain:
        want = ref.student_rollout(model, prompt, noise(model), FRAMES // CHUNK, len(STEPS) - 1,
                                   grad_from=FRAMES, s=s, grad=False)
    assert ours.frames == plain.frames
    assert (got - want).abs().max() < TOL
