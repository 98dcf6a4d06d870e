"""ODE init (CausVid, Self-Forcing), written out plainly: the teacher's ODE pairs and one
regression step of the causal student. No rollout engine, no plans, no recipe module.

Pairs: the frozen bidirectional teacher integrates the flow ODE with Euler over
    sigma_k = shift(linspace(sigma_max, 0, N + 1)[k]), k = 0 .. N - 1, then sigma_N = 0
    x_{k+1} = x_k + (sigma_{k+1} - sigma_k) v_k,   v_k = v_u + g (v_c - v_u)
(CFG with the negative prompt; Self-Forcing: N = 48, shift 8, g = 6 in this form) from
Gaussian noise x_0, and keeps the states at a few indices, the clean x_N last (Self-Forcing:
[0, 12, 24, 36, -1]), with their timesteps 1000 sigma_k.

Regression step: per sample, every chunk picks one stored state uniformly; the student sees
each chunk at its state's latent and timestep in ONE block-causal forward over the clip,
predicts x0 = x_t - sigma v and regresses the stored clean latent: the mean squared error
over the frames whose state is noisy (chunks that picked the clean state are context only).
"""

from __future__ import annotations

import torch

from .primitives import cfg, shift_sigma, sigma_from_t, timestep_input, x0_from_flow

STATE_STREAM = "stored_state"      # the recipe's stream of the per-chunk state choice


def euler_sigmas(steps: int, shift: float, sigma_max: float) -> list[float]:
    """[steps + 1] levels, descending, the last 0."""
    base = torch.linspace(sigma_max, 0.0, steps + 1, dtype=torch.float64)[:-1]
    return [float(shift_sigma(s, shift)) for s in base] + [0.0]


@torch.no_grad()
def ode_trajectory(teacher, noise: torch.Tensor, cond: torch.Tensor, negative: torch.Tensor, guidance: float,
                   sigmas: list[float]) -> list[torch.Tensor]:
    """Every Euler state x_0 (the noise) .. x_N (the clean output), each [B, C, F, H, W]."""
    x, states = noise, [noise]
    B, F = noise.shape[0], noise.shape[2]
    uncond = negative.expand(B, -1, -1)
    for k in range(len(sigmas) - 1):
        t = timestep_input(sigmas[k], B, F)
        v = cfg(teacher(x, t, cond), teacher(x, t, uncond), guidance)
        x = x + (sigmas[k + 1] - sigmas[k]) * v
        states.append(x)
    return states


def ode_regression_loss(generator, ode: torch.Tensor, levels: torch.Tensor, context: torch.Tensor, ctx,
                        chunk: int, window: int | None = None, sink: int = 0) -> torch.Tensor:
    """ode [B, S, C, F, H, W] stored states (the clean one last), levels [B, S] their
    timesteps, context [B, L, D]: the masked MSE of the student's x0 against ode[:, -1]."""
    B, S, _, F = ode.shape[:4]
    x_t, t = torch.empty_like(ode[:, 0]), torch.empty(B, F)
    for i in range(B):
        pick = torch.randint(0, S, (1, F // chunk), generator=ctx.stream(STATE_STREAM).generator(i))[0]
        for u, state in enumerate(pick.tolist()):
            frames = slice(u * chunk, (u + 1) * chunk)
            x_t[i, :, frames] = ode[i, state, :, frames]
            t[i, frames] = float(levels[i, state])
    sigma = sigma_from_t(t)
    v = generator(x_t, timestep_input(sigma, B, F), context, chunk_frames=chunk, window_frames=window,
                  sink_frames=sink)
    err = (x0_from_flow(x_t, v, sigma) - ode[:, -1]) ** 2          # [B, C, F, H, W]
    noisy = (t > 0)[:, None, :, None, None].expand_as(err)
    return err[noisy].mean()
