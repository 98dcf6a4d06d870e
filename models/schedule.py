"""Flow-matching schedule (Wan2.1 / rectified flow) and the teacher's ODE solvers.

Conventions (see reference/wan2.1.md):

    x_t = (1 - sigma) * x0 + sigma * noise          sigma in [0, 1]; 0 = clean, 1 = pure noise
    v   = noise - x0                                 what the DiT predicts
    x0  = x_t - sigma * v
    timestep t = sigma * NUM_TRAIN_TIMESTEPS         the DiT's input, in [0, 1000]
    shift: sigma' = shift * sigma / (1 + (shift - 1) * sigma)

Shapes: `sigma` broadcasts against latents [B, C, F, H, W] from a float, a [B] tensor (one
level per sample) or a [B, F] tensor (one level per frame, the causal students).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ForcelabError

NUM_TRAIN_TIMESTEPS = 1000
TEACHER_SIGMA_MAX = 1.0 - 1.0 / NUM_TRAIN_TIMESTEPS  # Wan's sampling starts one training step below 1
SOLVERS = ("euler", "unipc")


# ---------------------------------------------------------------------- sigma <-> timestep
def shift_sigma(sigma, shift: float):
    """Shift noise levels towards 1 (more steps at high noise): s' = shift*s / (1 + (shift-1)*s)."""
    if shift <= 0:
        raise ForcelabError(f"shift must be > 0, got {shift}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_to_timestep(sigma):
    return sigma * NUM_TRAIN_TIMESTEPS


def timestep_to_sigma(timestep):
    return timestep / NUM_TRAIN_TIMESTEPS


def training_sigmas(shift: float, num: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The training table: shift(linspace(1, 0, num + 1)[:-1]), [num] descending from 1."""
    return shift_sigma(torch.linspace(1.0, 0.0, num + 1, dtype=torch.float64)[:-1], shift)


def warp_timesteps(steps: Sequence[float], shift: float) -> list[float]:
    """Few-step denoising lists through the shifted training table (Self-Forcing's "warp").

    Timestep t is looked up at index NUM_TRAIN_TIMESTEPS - t of `training_sigmas(shift)`,
    i.e. t' = 1000 * shift(t / 1000); t = 0 stays 0. [1000, 750, 500, 250] with shift 5 ->
    [1000, 937.5, 833.33, 625]."""
    out = []
    for t in steps:
        if not 0 <= t <= NUM_TRAIN_TIMESTEPS:
            raise ForcelabError(f"denoising step {t} is outside [0, {NUM_TRAIN_TIMESTEPS}]")
        out.append(float(sigma_to_timestep(shift_sigma(t / NUM_TRAIN_TIMESTEPS, shift))))
    return out


def teacher_sigmas(num_steps: int, shift: float, sigma_max: float = TEACHER_SIGMA_MAX) -> torch.Tensor:
    """Sampling sigmas of the teacher, [num_steps + 1] descending, ending at 0:
    shift(linspace(sigma_max, 0, num_steps + 1)[:-1]) then 0 (Wan's UniPC/Euler sampling)."""
    if num_steps < 1:
        raise ForcelabError(f"the teacher needs at least one sampling step, got {num_steps}")
    base = torch.linspace(sigma_max, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    return torch.cat([shift_sigma(base, shift), base.new_zeros(1)])


# ---------------------------------------------------------------------- latents
def _expand(sigma, like: torch.Tensor) -> torch.Tensor:
    """float | [B] | [B, F] -> broadcastable against [B, C, F, H, W] (fp32 math)."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=like.device)
    if s.ndim == 0:
        return s
    if s.ndim == 1:
        return s.view(-1, 1, 1, 1, 1)
    if s.ndim == 2:
        return s.view(s.shape[0], 1, s.shape[1], 1, 1)
    raise ValueError(f"sigma must be a scalar, [B] or [B, F], got shape {tuple(s.shape)}")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma noise."""
    s = _expand(sigma, x0)
    return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    s = _expand(sigma, x_t)
    return (x_t.float() - s * v.float()).to(x_t.dtype)


def v_from_x0(x_t: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    """v = (x_t - x0) / sigma (undefined at sigma = 0)."""
    s = _expand(sigma, x_t)
    return ((x_t.float() - x0.float()) / s).to(x_t.dtype)


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The training target of the flow prediction: v = noise - x0."""
    return noise - x0


def euler_step(x_t: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step of dx/dsigma = v: x + v * (sigma_next - sigma)."""
    ds = _expand(sigma_next, x_t) - _expand(sigma, x_t)
    return (x_t.float() + ds * v.float()).to(x_t.dtype)


# ---------------------------------------------------------------------- teacher solvers
class EulerSolver:
    """Deterministic Euler over `sigmas` ([N + 1], last 0). step(i, x, v) -> x at sigmas[i + 1]."""

    def __init__(self, sigmas: torch.Tensor):
        self.sigmas = sigmas

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return euler_step(x, v, float(self.sigmas[i]), float(self.sigmas[i + 1]))


class UniPCSolver:
    """UniPC (bh2, order 2, predictor-corrector) in flow mode: diffusers'
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True), given
    the same sigmas as `teacher_sigmas(num_steps, shift, sigma_max)`.

    Multistep: it keeps the previous model outputs, so every step must be called in order on
    the same sample (one solver per clip)."""

    def __init__(self, num_steps: int, shift: float, sigma_max: float = TEACHER_SIGMA_MAX):
        try:
            from diffusers import UniPCMultistepScheduler
        except ImportError:  # diffusers is the optional "wan" extra
            raise ForcelabError("the UniPC solver needs diffusers (pip install 'forcelab[wan]'); "
                                "or use the Euler solver") from None
        self.sigmas = teacher_sigmas(num_steps, shift, sigma_max)
        self._sched = UniPCMultistepScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type="flow_prediction",
            use_flow_sigmas=True, flow_shift=shift, solver_order=2, lower_order_final=True)
        base = torch.linspace(sigma_max, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
        self._sched.set_timesteps(sigmas=base.numpy())  # diffusers applies flow_shift itself

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t = self._sched.timesteps[i]
        return self._sched.step(v.float(), t, x.float()).prev_sample.to(x.dtype)


def make_solver(name: str, num_steps: int, shift: float, sigma_max: float = TEACHER_SIGMA_MAX):
    """Euler or UniPC over teacher_sigmas(num_steps, shift); both expose .sigmas and .step()."""
    if name == "euler":
        return EulerSolver(teacher_sigmas(num_steps, shift, sigma_max))
    if name == "unipc":
        return UniPCSolver(num_steps, shift, sigma_max)
    raise ForcelabError(f"unknown solver {name!r}; choose one of {SOLVERS}")
