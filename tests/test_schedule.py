"""Flow-matching schedule and the teacher's solvers against hand-computed numbers."""

import pytest
import torch

from forcelab.errors import ForcelabError
from forcelab.models.schedule import (
    add_noise, euler_step, flow_target, make_solver, shift_sigma, sigma_to_timestep, teacher_sigmas,
    timestep_to_sigma, training_sigmas, v_from_x0, warp_timesteps, x0_from_v)


def test_shift_by_hand():
    # 5 * 0.5 / (1 + 4 * 0.5) = 2.5 / 3
    assert shift_sigma(0.5, 5.0) == pytest.approx(0.8333333333)
    assert shift_sigma(0.25, 3.0) == pytest.approx(0.75 / 1.5)
    assert shift_sigma(1.0, 8.0) == 1.0 and shift_sigma(0.0, 8.0) == 0.0
    assert shift_sigma(0.3, 1.0) == pytest.approx(0.3)   # shift 1 is the identity
    with pytest.raises(ForcelabError):
        shift_sigma(0.5, 0.0)


def test_timestep_sigma_round_trip():
    assert sigma_to_timestep(0.25) == 250.0 and timestep_to_sigma(625.0) == 0.625


def test_warp_timesteps_by_hand():
    # index 1000 - t of shift(linspace(1, 0, 1001)[:-1]) = 1000 * shift(t / 1000)
    got = warp_timesteps([1000, 750, 500, 250], 5.0)
    assert got == pytest.approx([1000.0, 937.5, 2500 / 3, 625.0])
    table = training_sigmas(5.0)
    assert table.shape == (1000,)
    for t, w in zip([1000, 750, 500, 250], got):
        assert 1000 * float(table[1000 - t]) == pytest.approx(w)
    assert warp_timesteps([1000, 800, 600, 400, 200], 5.0)[1] == pytest.approx(1000 * 4 / 4.2)
    assert warp_timesteps([0], 5.0) == [0.0]
    with pytest.raises(ForcelabError, match="outside"):
        warp_timesteps([1200], 5.0)


def test_teacher_sigmas_by_hand():
    # shift(linspace(0.999, 0, 3)[:-1]) + [0] = shift([0.999, 0.4995]) + [0]
    s = teacher_sigmas(2, 5.0)
    assert s.tolist() == pytest.approx([4.995 / 4.996, 2.4975 / 2.998, 0.0])
    assert teacher_sigmas(4, 1.0).tolist() == pytest.approx([0.999, 0.74925, 0.4995, 0.24975, 0.0])


def test_noise_and_predictions_by_hand():
    x0 = torch.full((1, 1, 2, 1, 1), 2.0)
    noise = torch.full_like(x0, -1.0)
    sigma = torch.tensor([[0.25, 0.75]])                      # per frame [B, F]
    xt = add_noise(x0, noise, sigma)
    assert xt.flatten().tolist() == pytest.approx([0.75 * 2 - 0.25, 0.25 * 2 - 0.75])
    v = flow_target(x0, noise)
    assert v.flatten().tolist() == [-3.0, -3.0]
    assert torch.allclose(x0_from_v(xt, v, sigma), x0)
    assert torch.allclose(v_from_x0(xt, x0, sigma), v)
    # Euler from sigma 0.75 to 0.25 with v = -3: x + (-3) * (0.25 - 0.75) = x + 1.5
    assert euler_step(xt, v, 0.75, 0.25).flatten().tolist() == pytest.approx([2.75, 1.25])
    # per-sample sigma [B]
    assert add_noise(x0, noise, torch.tensor([0.5])).flatten().tolist() == [0.5, 0.5]


def _gaussian_flow(m, s):
    """Data x0 ~ N(m, s^2): the exact flow v(x, sigma) = (x - E[x0 | x]) / sigma and the exact
    ODE map from sigma1 to 0 (affine, so it is the monotone map between the two Gaussians)."""
    def v(x, sigma):
        a = 1 - sigma
        x0 = m + a * s * s / (a * a * s * s + sigma * sigma) * (x - a * m)
        return (x - x0) / sigma

    def solution(x, sigma1):
        a = 1 - sigma1
        return m + s * (x - a * m) / (a * a * s * s + sigma1 * sigma1) ** 0.5
    return v, solution


def _solve_error(name, steps):
    v, solution = _gaussian_flow(0.3, 0.5)
    x = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    solver = make_solver(name, steps, 3.0)
    exact = solution(x, float(solver.sigmas[0]))
    for i in range(steps):
        x = solver.step(i, x, v(x, float(solver.sigmas[i])))
    return float((x - exact).abs().max())


def test_solvers_converge_at_their_order():
    euler = [_solve_error("euler", n) for n in (10, 20, 40)]
    unipc = [_solve_error("unipc", n) for n in (10, 20, 40)]
    assert 1.6 < euler[0] / euler[1] < 2.5 and 1.6 < euler[1] / euler[2] < 2.5   # first order
    assert unipc[1] / unipc[2] > 3.0                                             # higher order
    assert unipc[2] < euler[2] / 10


def test_unipc_uses_the_teacher_sigmas():
    solver = make_solver("unipc", 10, 5.0)
    assert torch.allclose(solver._sched.sigmas.double(), teacher_sigmas(10, 5.0), atol=1e-6)
    with pytest.raises(ForcelabError, match="unknown solver"):
        make_solver("ddim", 10, 5.0)
