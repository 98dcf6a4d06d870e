"""DMD / SiD / critic losses on problems with closed-form scores, and against hand computation.

The analytic problem: per channel, latents are Gaussian N(m, s^2), i.i.d. over frames and
pixels. Its exact flow-matching x0 predictor at x_t = (1 - sigma) x0 + sigma noise is
    E[x0 | x_t] = m + k (x_t - (1 - sigma) m),   k = (1 - sigma) s^2 / ((1 - sigma)^2 s^2 + sigma^2).
The generator is an affine map of noise (x0 = a z + b per channel, so exactly N(b, a^2)) and
the fake score is the exact x0 predictor of its CURRENT distribution (recomputed each step).
"""

import math

import pytest
import torch

from forcelab.distill.dmd import critic_loss, dmd_loss, guidance_from_cond_form, masked_mean, sid_loss, x0_predictor
from forcelab.train.timesteps import ScoreTimesteps

REAL_MEAN, REAL_STD = (1.5, -1.0), (0.5, 2.0)   # two channels: one must shrink, one must widen
SHAPE = (64, 2, 3, 2, 2)                        # [B, C, F, H, W]


def gaussian_x0(mean, std):
    """Exact x0 predictor of per-channel N(mean, std^2); mean / std: sequences or [C] tensors."""
    m = torch.as_tensor(mean, dtype=torch.float64).view(1, -1, 1, 1, 1)
    s2 = torch.as_tensor(std, dtype=torch.float64).view(1, -1, 1, 1, 1) ** 2

    def score(x_t, sigma):
        sg = torch.as_tensor(sigma, dtype=torch.float64)
        sg = sg.view(-1, 1, 1, 1, 1) if sg.ndim == 1 else sg.view(sg.shape[0], 1, sg.shape[1], 1, 1)
        k = (1 - sg) * s2 / ((1 - sg) ** 2 * s2 + sg ** 2)
        return m + k * (x_t.double() - (1 - sg) * m)
    return score


def kl_to_real(mean, std) -> float:
    """KL(N(mean, std^2) || real), summed over channels."""
    total = 0.0
    for m1, s1, m2, s2 in zip(mean, std, REAL_MEAN, REAL_STD):
        total += math.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
    return total


def train_generator(loss_fn, steps: int, **kwargs):
    """Adam on the affine generator against the exact real / current-fake scores -> (KL before, after)."""
    g = torch.Generator().manual_seed(0)
    a = torch.ones(2, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([a, b], lr=0.02)
    real = gaussian_x0(REAL_MEAN, REAL_STD)
    before = kl_to_real(b.tolist(), a.abs().tolist())
    for _ in range(steps):
        z = torch.randn(SHAPE, generator=g, dtype=torch.float64)
        x0 = a.view(1, -1, 1, 1, 1) * z + b.view(1, -1, 1, 1, 1)
        fake = gaussian_x0(b.detach().clone(), a.detach().abs().clone())
        loss, logs = loss_fn(x0, real, fake, generator=g, **kwargs)
        assert loss.dtype == torch.float64 and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, kl_to_real(b.tolist(), a.abs().tolist())


# ---------------------------------------------------------------------- direction (Must show 1)
def test_dmd_moves_generator_to_real_distribution():
    before, after = train_generator(dmd_loss, steps=150)
    # measured: 5.75 -> 1.8e-5 (DMD), 2.5e-5 / 2.7e-5 (SiD alpha 1 / 1.2) (150 Adam steps, lr 0.02, batch 64)
    assert before > 5.7 and after < 1e-3, (before, after)


@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_sid_moves_generator_to_real_distribution(alpha):
    before, after = train_generator(sid_loss, steps=150, alpha=alpha)
    assert before > 5.7 and after < 1e-3, (before, after)


def test_dmd_with_swapped_scores_moves_away():
    """The test can fail: the opposite sign (fake and real swapped) must raise the KL."""
    before, after = train_generator(lambda x0, real, fake, **kw: dmd_loss(x0, fake, real, **kw), steps=30)
    assert after > before, (before, after)


# ---------------------------------------------------------------------- DMD by hand
def _fixed_scores():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(2, 1, 3, 2, 2, generator=g, dtype=torch.float64)
    fake = torch.randn(2, 1, 3, 2, 2, generator=g, dtype=torch.float64)
    seen = {}

    def real_score(x_t, sigma):
        seen["real"] = (x_t.clone(), sigma.clone())
        return real

    def fake_score(x_t, sigma):
        seen["fake"] = (x_t.clone(), sigma.clone())
        return fake
    return real, fake, real_score, fake_score, seen


def test_dmd_loss_and_gradient_by_hand():
    real, fake, real_score, fake_score, seen = _fixed_scores()
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 1, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(2, 1, 3, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([250.0, 900.0], dtype=torch.float64)
    loss, logs = dmd_loss(x0, real_score, fake_score, timestep=t, noise=noise)
    loss.backward()
    sigma = (t / 1000).view(-1, 1, 1, 1, 1)
    x_t = (1 - sigma) * x0.detach() + sigma * noise
    for name in ("real", "fake"):                      # both scores see the same x_t and sigma
        torch.testing.assert_close(seen[name][0], x_t)
        torch.testing.assert_close(seen[name][1], t / 1000)
    norm = (x0.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    grad = (fake - real) / norm
    torch.testing.assert_close(loss, 0.5 * (grad ** 2).mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(x0.grad, grad / grad.numel(), rtol=1e-12, atol=0)
    torch.testing.assert_close(logs["dmd_grad_abs_mean"], grad.abs().mean())


def test_dmd_mask_blocks_gradient_to_masked_frames():
    real, fake, real_score, fake_score, _ = _fixed_scores()
    x0 = torch.randn(2, 1, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    mask = torch.tensor([[False, True, True], [False, False, True]])
    t = torch.tensor([500.0, 500.0])
    loss, _ = dmd_loss(x0, real_score, fake_score, timestep=t, noise=torch.zeros_like(x0), mask=mask)
    loss.backward()
    frame_grad = x0.grad.abs().sum(dim=(1, 3, 4))                 # [B, F]
    assert (frame_grad[~mask] == 0).all() and (frame_grad[mask] > 0).all()
    # the normaliser still covers all frames; the mean covers only the masked ones
    norm = (x0.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    grad = (fake - real) / norm
    keep = mask[:, None, :, None, None].expand_as(grad)
    torch.testing.assert_close(loss, 0.5 * (grad[keep] ** 2).mean(), rtol=1e-12, atol=0)


def test_dmd_float64_and_nonfinite_grad():
    """bf16 samples -> float64 loss; a sample with a zero normaliser (x0 equal to the teacher's
    x0) and a NaN in the critic's output get zero gradient, the rest is unchanged."""
    x0 = torch.randn(3, 1, 2, 2, 2, generator=torch.Generator().manual_seed(4)).bfloat16().requires_grad_()
    real = x0.detach().double().clone()
    real[1:] += 0.25                                   # sample 0: real == x0 -> normaliser 0
    fake = real + 0.5
    fake[2, 0, 1, 0, 0] = float("nan")
    loss, _ = dmd_loss(x0, lambda x, s: real, lambda x, s: fake, timestep=torch.full((3,), 500.0))
    loss.backward()
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    assert x0.grad.dtype == torch.bfloat16 and torch.isfinite(x0.grad.float()).all()
    assert (x0.grad[0] == 0).all() and x0.grad[2, 0, 1, 0, 0] == 0
    grad = torch.full_like(real, 0.5 / 0.25)
    grad[0] = 0
    grad[2, 0, 1, 0, 0] = 0
    torch.testing.assert_close(loss, 0.5 * (grad ** 2).mean(), rtol=1e-12, atol=0)


def test_masked_mean_by_hand():
    v = torch.arange(2 * 1 * 3 * 1 * 1, dtype=torch.float64).view(2, 1, 3, 1, 1)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    assert masked_mean(v, mask).item() == (0 + 2) / 2
    assert masked_mean(v, torch.zeros(2, 3, dtype=torch.bool)).item() == 0
    v[1] = float("nan")                                  # a non-finite value in a masked-out frame
    assert masked_mean(v, mask).item() == 1
    with pytest.raises(ValueError):
        masked_mean(v, torch.ones(2, 2, dtype=torch.bool))


# ---------------------------------------------------------------------- CFG convention
class _LinearDiT:
    """A stand-in DiT: v = x * mean(context) + t / 1000 (context [B, L, D])."""

    def __call__(self, x, t, context, chunk_frames=None):
        return x * context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1) + (t / 1000)[:, None, :, None, None]


def test_cfg_form_by_hand():
    x_t = torch.randn(2, 1, 3, 2, 2, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([0.3, 0.8])
    cond, uncond = torch.full((2, 4, 8), 2.0), torch.full((2, 4, 8), -1.0)
    got = x0_predictor(_LinearDiT(), cond, uncond, guidance=4.0)(x_t, sigma)
    s = sigma.view(-1, 1, 1, 1, 1)
    v_c, v_u = x_t * 2.0 + s, x_t * -1.0 + s
    torch.testing.assert_close(got, x_t - s * (v_u + 4.0 * (v_c - v_u)))
    # Self-Forcing's w = 3 in cond + w (cond - uncond) is guidance 4 here
    assert guidance_from_cond_form(3.0) == 4.0
    torch.testing.assert_close(got, x_t - s * (v_c + 3.0 * (v_c - v_u)))
    # no negative prompt: the plain conditional x0 (the critic)
    torch.testing.assert_close(x0_predictor(_LinearDiT(), cond)(x_t, sigma), x_t - s * v_c)


# ---------------------------------------------------------------------- SiD details
def test_sid_mask_blocks_gradient_through_frame_mixing_scores():
    """Scores that mix frames (like bidirectional attention) must not carry gradient to
    masked-out frames."""
    def mixing(scale):
        return lambda x_t, sigma: scale * x_t + x_t.mean(dim=2, keepdim=True)
    x0 = torch.randn(2, 1, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6), requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, True, False]])
    loss, _ = sid_loss(x0, mixing(0.5), mixing(0.2), mask=mask, timestep=torch.tensor([300.0, 700.0]),
                       generator=torch.Generator().manual_seed(7))
    loss.backward()
    frame_grad = x0.grad.abs().sum(dim=(1, 3, 4))
    assert (frame_grad[~mask] == 0).all() and (frame_grad[mask] > 0).all()


def test_sid_loss_value_by_hand():
    g = torch.Generator().manual_seed(8)
    x0 = torch.randn(2, 1, 2, 2, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 1, 2, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([400.0, 600.0])
    real_fn, fake_fn = (lambda x, s: 0.9 * x), (lambda x, s: 0.7 * x + 0.1)
    loss, _ = sid_loss(x0, real_fn, fake_fn, alpha=1.2, timestep=t, noise=noise)
    s = (t.double() / 1000).view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    r, f = 0.9 * x_t, 0.7 * x_t + 0.1
    norm = (x0 - r).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(loss, ((r - f) * ((r - x0) - 1.2 * (r - f)) / norm).mean(), rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------- critic
GEN_MEAN, GEN_STD = (0.3, -0.7), (1.2, 0.4)


def _generator_batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, 3, 2, 2, generator=g, dtype=torch.float64)
    x0 = torch.tensor(GEN_STD, dtype=torch.float64).view(1, -1, 1, 1, 1) * z + \
        torch.tensor(GEN_MEAN, dtype=torch.float64).view(1, -1, 1, 1, 1)
    return x0, g


def test_critic_loss_is_minimised_by_exact_x0_predictor():
    x0, g = _generator_batch(4096, seed=9)
    t = ScoreTimesteps().sample(x0.shape[0], generator=g).double()
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    exact = gaussian_x0(GEN_MEAN, GEN_STD)

    def loss_of(score):
        return critic_loss(x0, score, timestep=t, noise=noise)[0].item()
    best = loss_of(exact)
    delta = 0.05
    for other in (lambda x, s: exact(x, s) + delta, lambda x, s: exact(x, s) - delta,
                  lambda x, s: 1.05 * exact(x, s), gaussian_x0((0.4, -0.7), GEN_STD), gaussian_x0(GEN_MEAN, (1.2, 0.5)),
                  gaussian_x0(REAL_MEAN, REAL_STD)):
        assert loss_of(other) > best
    # the excess loss of a constant offset is E[delta^2 / sigma^2] (the cross term averages out)
    excess = loss_of(lambda x, s: exact(x, s) + delta) - best
    expected = (delta ** 2 / (t / 1000) ** 2).mean().item()
    assert excess == pytest.approx(expected, rel=0.1)


def test_critic_loss_trains_a_critic_to_the_generator_distribution():
    """A critic with the Gaussian form and learnable (mean, log std), trained only with
    critic_loss on generator samples, recovers the generator's mean and std."""
    mean = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    log_std = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([mean, log_std], lr=0.03)
    g = torch.Generator().manual_seed(10)
    for step in range(200):
        x0, _ = _generator_batch(64, seed=100 + step)
        loss, _ = critic_loss(x0, gaussian_x0(mean, log_std.exp()), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(mean.detach(), torch.tensor(GEN_MEAN, dtype=torch.float64), atol=0.05, rtol=0)
    torch.testing.assert_close(log_std.detach().exp(), torch.tensor(GEN_STD, dtype=torch.float64), atol=0.05, rtol=0)


def test_critic_loss_mask_and_detach():
    x0 = torch.randn(2, 1, 3, 2, 2, generator=torch.Generator().manual_seed(11), requires_grad=True)
    w = torch.zeros(1, requires_grad=True)
    mask = torch.tensor([[True, False, False], [True, True, False]])
    loss, _ = critic_loss(x0, lambda x_t, s: w * x_t, mask=mask, generator=torch.Generator().manual_seed(12))
    loss.backward()
    assert x0.grad is None and w.grad is not None and w.grad.abs() > 0


def test_dmd_with_a_learned_critic():
    """The full DMD2 loop on the Gaussian problem: the critic (Gaussian form, learnable mean and
    log std, from a wrong start) trains only with critic_loss on detached generator samples,
    3 critic steps per generator step; the generator trains with dmd_loss against it."""
    g = torch.Generator().manual_seed(13)
    a = torch.ones(2, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    c_mean = torch.full((2,), 0.5, dtype=torch.float64, requires_grad=True)
    c_log_std = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    gen_opt = torch.optim.Adam([a, b], lr=0.02)
    critic_opt = torch.optim.Adam([c_mean, c_log_std], lr=0.05)
    real = gaussian_x0(REAL_MEAN, REAL_STD)
    before = kl_to_real(b.tolist(), a.abs().tolist())
    for _ in range(150):
        for _ in range(3):
            x0 = a.view(1, -1, 1, 1, 1) * torch.randn(SHAPE, generator=g, dtype=torch.float64) + b.view(1, -1, 1, 1, 1)
            loss, _ = critic_loss(x0, gaussian_x0(c_mean, c_log_std.exp()), generator=g)
            critic_opt.zero_grad()
            loss.backward()
            critic_opt.step()
        loss, _ = dmd_loss(x0, real, gaussian_x0(c_mean.detach(), c_log_std.detach().exp()), generator=g)
        gen_opt.zero_grad()
        loss.backward()
        gen_opt.step()
    after = kl_to_real(b.tolist(), a.abs().tolist())
    assert after < 0.01, (before, after)       # measured: 5.75 -> 6.0e-4


# ---------------------------------------------------------------------- on the toy DiT
def test_losses_on_toy_dit():
    """The score callables built from CausalDiT (bidirectional): DMD sends no gradient into
    either score network, the critic loss trains only the critic, SiD reaches the generator
    samples through both."""
    from forcelab.models import CausalDiT, DiTConfig
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = CausalDiT(DiTConfig.preset("toy")).eval()
        critic = CausalDiT(DiTConfig.preset("toy")).eval()
    critic.load_state_dict(teacher.state_dict())               # the critic starts as the teacher
    teacher.requires_grad_(False)
    g = torch.Generator().manual_seed(14)
    prompt, negative = torch.randn(2, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    real = x0_predictor(teacher, prompt, negative, guidance=4.0)
    fake = x0_predictor(critic, prompt)
    x0 = torch.randn(2, teacher.config.in_channels, 2, 4, 4, generator=g, requires_grad=True)   # [B, C, F, H, W]

    loss, logs = dmd_loss(x0, real, fake, generator=g, mask=torch.tensor([[True, False], [True, True]]))
    loss.backward()
    assert torch.isfinite(loss) and x0.grad.abs().sum() > 0 and (x0.grad[0, :, 1] == 0).all()
    assert all(p.grad is None for p in critic.parameters()) and 20 <= logs["dmd_timestep_mean"] <= 980

    x0.grad = None
    loss, _ = critic_loss(x0, fake, generator=g)
    loss.backward()
    assert x0.grad is None and all(p.grad is not None for p in critic.parameters())

    critic.zero_grad(set_to_none=True)
    loss, _ = sid_loss(x0, real, fake, generator=g)
    loss.backward()
    assert torch.isfinite(loss) and x0.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.parameters())
