"""Causal Forcing's two initialisations, written out plainly: the causal teacher's ODE pairs and
one causal consistency-distillation step. No rollout engine, no KV cache, no plans, no
teacher-forcing layout, no recipe module: every chunk is a fresh block-causal forward over
[the clean earlier chunks | this chunk].

Causal ODE pairs: chunk by chunk, the AR teacher integrates the flow ODE with Euler over the
levels sigma_0 > ... > sigma_{N-1} > sigma_N = 0 from the chunk's noise, every step seeing the
CLEAN (finished) earlier chunks at t = 0; the finished chunk joins that clean context.

Causal CD: per sample n ~ U{0 .. N - 2} (stream "cd_step"), t = t_n, t' = t_{n+1} on the N levels
t_k = 1000 shift(1 - k / N); x_t = (1 - s_t) x0 + s_t eps (stream "noise"); the teacher's flow at
x_t (CFG uncond + g (cond - uncond)) with the clean chunks of x0 as context gives
x_t' = x_t + (s_t' - s_t) v; loss = mean (f(x_t, t) - sg(f_target(x_t', t')))^2 with
f = x - s v of the student / its target, both with the clean chunks of x0 as context.
"""

from __future__ import annotations

import torch

from .primitives import cfg, shift_sigma, x0_from_flow

CD_STEP_STREAM = "cd_step"       # the recipe's stream of the per-sample level index
NOISE_STREAM = "noise"           # ... and of the clip noise


def chunk_flow(model, clean: torch.Tensor, noisy: torch.Tensor, t_noisy: torch.Tensor, context, chunk: int,
               start: int) -> torch.Tensor:
    """The flow of the chunk `noisy` [B, C, chunk, H, W] at frames [start, start + chunk), at
    timesteps t_noisy [B, chunk], seeing clean[:, :, :start] at t = 0 (one block-causal forward)."""
    B = noisy.shape[0]
    x = torch.cat([clean[:, :, :start], noisy], dim=2)
    t = torch.cat([torch.zeros(B, start), t_noisy], dim=1)
    return model(x, t, context, chunk_frames=chunk)[:, :, start:]


def forced_flow(model, clean: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, context, chunk: int):
    """Every chunk of `noisy` [B, C, F, H, W] (timesteps t [B, F]) seeing the clean earlier chunks."""
    F = noisy.shape[2]
    return torch.cat([chunk_flow(model, clean, noisy[:, :, s:s + chunk], t[:, s:s + chunk], context, chunk, s)
                      for s in range(0, F, chunk)], dim=2)


@torch.no_grad()
def causal_ode_trajectory(teacher, noise: torch.Tensor, cond: torch.Tensor, sigmas: list[float],
                          chunk: int) -> list[torch.Tensor]:
    """states[k] [B, C, F, H, W]: every chunk at its k-th Euler state (k = 0: its noise, the
    last: its clean output); sigmas [N + 1] descending, the last 0."""
    B, F = noise.shape[0], noise.shape[2]
    states = [torch.empty_like(noise) for _ in sigmas]
    clean = noise[:, :, :0]
    for s in range(0, F, chunk):
        x = noise[:, :, s:s + chunk]
        for k in range(len(sigmas)):
            states[k][:, :, s:s + chunk] = x
            if k + 1 < len(sigmas):
                v = chunk_flow(teacher, clean, x, torch.full((B, chunk), 1000 * sigmas[k]), cond, chunk, s)
                x = x + (sigmas[k + 1] - sigmas[k]) * v
        clean = torch.cat([clean, x], dim=2)
    return states


def cd_levels(steps: int, shift: float) -> list[float]:
    """t_k = 1000 shift(1 - k / N), k = 0 .. N - 1."""
    return [1000 * shift_sigma(1 - k / steps, shift) for k in range(steps)]


def causal_cd_loss(generator, target, teacher, x0: torch.Tensor, context: torch.Tensor, negative: torch.Tensor,
                   ctx, steps: int, shift: float, guidance: float, chunk: int, teacher_chunk: int) -> torch.Tensor:
    """One causal CD loss of the student `generator` against its `target` (the EMA, or itself)."""
    B, F = x0.shape[0], x0.shape[2]
    levels = cd_levels(steps, shift)
    n = [int(torch.randint(0, steps - 1, (1,), generator=ctx.stream(CD_STEP_STREAM).generator(i)))
         for i in range(B)]
    t = torch.tensor([[levels[k]] * F for k in n])
    t_next = torch.tensor([[levels[k + 1]] * F for k in n])
    s, s_next = (t / 1000)[:, None, :, None, None], (t_next / 1000)[:, None, :, None, None]
    eps = torch.stack([torch.randn(x0.shape[1:], generator=ctx.stream(NOISE_STREAM).generator(i)) for i in range(B)])
    x_t = (1 - s) * x0 + s * eps
    with torch.no_grad():
        v_c = forced_flow(teacher, x0, x_t, t, context, teacher_chunk)
        v = v_c if guidance == 1.0 else cfg(v_c, forced_flow(teacher, x0, x_t, t, negative.expand(B, -1, -1),
                                                                  teacher_chunk), guidance)
        x_next = x_t + (s_next - s) * v
        want = x0_from_flow(x_next, forced_flow(target, x0, x_next, t_next, context, chunk), s_next)
    got = x0_from_flow(x_t, forced_flow(generator, x0, x_t, t, context, chunk), s)
    return ((got - want) ** 2).mean()
