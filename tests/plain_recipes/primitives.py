"""The plain math every reference recipe is built from, written out from the papers and the
recipe notes, WITHOUT forcelab's schedule / rollout / dmd / timesteps / plans code: the
references must not share a bug with the code they check. Only the DiT forward and the codec
are forcelab's.

Conventions (rectified flow, Wan2.1):
    t in [0, 1000], sigma = t / 1000; x_t = (1 - sigma) x0 + sigma eps; the DiT predicts the
    flow v = eps - x0, so x0 = x_t - sigma v.
Shapes: latents [B, C, F, H, W]; sigma a float, [B] (one level per sample) or [B, F] (one
level per frame); frame masks bool [B, F].
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

NUM_TIMESTEPS = 1000


# ---------------------------------------------------------------------- levels
def sigma_from_t(t):
    """sigma = t / 1000 (a float or a tensor of any shape)."""
    return t / NUM_TIMESTEPS


def shift_sigma(sigma, shift: float):
    """The timestep shift of SD3 / Wan: sigma' = shift sigma / (1 + (shift - 1) sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def shifted_table(shift: float) -> list[float]:
    """The 1000-entry shifted training table of timesteps, descending from 1000:
    entry i = 1000 * shift(1 - i / 1000), i = 0 .. 999 (Self-Forcing's scheduler.timesteps)."""
    return [NUM_TIMESTEPS * shift_sigma(1 - i / NUM_TIMESTEPS, shift) for i in range(NUM_TIMESTEPS)]


def warp_steps(steps, shift: float) -> list[float]:
    """A few-step denoising list looked up in the shifted table, as the public code does:
    t -> table[1000 - t] (integer t), with t = 0 -> 0 (the table is extended by a 0).
    [1000, 750, 500, 250], shift 5 -> [1000, 937.5, 833.3, 625]."""
    table = shifted_table(shift) + [0.0]
    out = []
    for t in steps:
        assert float(t).is_integer() and 0 <= t <= NUM_TIMESTEPS, t
        out.append(table[NUM_TIMESTEPS - int(t)])
    return out


def snap_to_table(t: float, shift: float) -> float:
    """The entry of the shifted table nearest to t (public code: noising and flow <-> x0
    happen at table entries)."""
    return min(shifted_table(shift), key=lambda entry: abs(entry - t))


def score_timestep(k: int, shift: float = 5.0, t_min: float = 20.0, t_max: float = 980.0,
                   snap_shift: float | None = None) -> float:
    """The DMD / critic timestep from a raw integer k ~ U{0 .. 999}: t = 1000 shift(k / 1000),
    clamped to [t_min, t_max] (Self-Forcing: shift 5, [20, 980]); optionally snapped."""
    t = NUM_TIMESTEPS * shift_sigma(k / NUM_TIMESTEPS, shift)
    t = min(max(t, t_min), t_max)
    return t if snap_shift is None else snap_to_table(t, snap_shift)


# ---------------------------------------------------------------------- latents
def _as_levels(sigma, like: torch.Tensor) -> torch.Tensor:
    """float | [B] | [B, F] -> a float32 tensor broadcastable against like [B, C, F, H, W]."""
    s = torch.as_tensor(sigma, dtype=torch.float32)
    if s.ndim == 1:
        return s[:, None, None, None, None]
    if s.ndim == 2:
        return s[:, None, :, None, None]
    return s


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma eps."""
    s = _as_levels(sigma, x0)
    return (1 - s) * x0 + s * eps


def x0_from_flow(x_t: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """x0 = x_t - sigma v (v the DiT's flow prediction eps - x0)."""
    return x_t - _as_levels(sigma, x_t) * v


def flow_from_x0(x_t: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    """v = (x_t - x0) / sigma (sigma > 0)."""
    return (x_t - x0) / _as_levels(sigma, x_t)


def timestep_input(sigma, batch: int, frames: int) -> torch.Tensor:
    """The DiT's timestep input [B, F] = 1000 sigma for a float, [B] or [B, F] sigma."""
    s = torch.as_tensor(sigma, dtype=torch.float32)
    if s.ndim == 0:
        s = s.expand(batch)
    if s.ndim == 1:
        s = s[:, None].expand(batch, frames)
    return s * NUM_TIMESTEPS


# ---------------------------------------------------------------------- the DiT as a score
def predict_x0(model, x_t: torch.Tensor, sigma, context: torch.Tensor, **layout) -> torch.Tensor:
    """One DiT forward on the whole clip -> x0 [B, C, F, H, W]. layout: nothing (bidirectional),
    or chunk_frames / window_frames / sink_frames (block-causal)."""
    B, _, F = x_t.shape[:3]
    v = model(x_t, timestep_input(sigma, B, F), context, **layout)
    return x0_from_flow(x_t, v, sigma)


def cfg(cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """forcelab's guidance convention: uncond + g (cond - uncond) (the public configs'
    cond + w (cond - uncond) is g = w + 1)."""
    return uncond + guidance * (cond - uncond)


def guided_x0(model, x_t: torch.Tensor, sigma, cond: torch.Tensor, uncond: torch.Tensor,
              guidance: float) -> torch.Tensor:
    """The real score: cfg of the cond and uncond x0 predictions, two separate forwards.
    cond [B, L, D]; uncond [1 or B, L', D] (the negative prompt)."""
    x0_c = predict_x0(model, x_t, sigma, cond)
    x0_u = predict_x0(model, x_t, sigma, uncond.expand(x_t.shape[0], -1, -1))
    return cfg(x0_c, x0_u, guidance)


def causal_chunk_forward(model, past_x: torch.Tensor | None, past_t: torch.Tensor | None,
                         x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, chunk_frames: int,
                         window_frames: int | None = None, sink_frames: int = 0) -> torch.Tensor:
    """The flow v [B, C, n, H, W] of the n frames x being denoised at timesteps t [B, n],
    after the committed frames past_x [B, C, p, H, W] at past_t [B, p] (None: no past).

    No KV cache: one block-causal forward over [past | x] (each chunk sees itself and the
    earlier chunks, within the window + sink), keeping the last n frames. The past frames are
    recomputed at their commit timestep, which is what a KV cache holds: their keys and
    values as CONSTANTS (the clean pass runs without gradient), so they are detached in every
    self-attention layer - otherwise the parameters would get gradient through the context
    frames. (A sink whose RoPE moves to sit next to the window, "adjacent" sink RoPE, cannot
    be expressed this way.)"""
    if past_x is None or past_x.shape[2] == 0:
        return model(x, t, context, chunk_frames=chunk_frames, window_frames=window_frames,
                     sink_frames=sink_frames)
    p, n = past_x.shape[2], x.shape[2]
    with context_keys_detached(p / (p + n)):
        v = model(torch.cat([past_x, x], dim=2), torch.cat([past_t, t], dim=1), context,
                  chunk_frames=chunk_frames, window_frames=window_frames, sink_frames=sink_frames)
    return v[:, :, p:]


@contextmanager
def context_keys_detached(fraction: float):
    """Within the block: the DiT's self-attention sees the keys and values of the first
    `fraction` of the tokens (the context frames; tokens are frame-major) detached. Done by
    wrapping the attention function models/dit.py calls (cross-attention does not use it)."""
    from forcelab.models import dit

    real = dit.attention

    def attention(q, k, v, layout, **kw):
        c = round(k.shape[1] * fraction)
        k = torch.cat([k[:, :c].detach(), k[:, c:]], dim=1)
        v = torch.cat([v[:, :c].detach(), v[:, c:]], dim=1)
        return real(q, k, v, layout, **kw)

    dit.attention = attention
    try:
        yield
    finally:
        dit.attention = real


# ---------------------------------------------------------------------- losses
def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of values [B, C, F, H, W] over the frames where mask [B, F] is True (all: None).
    An empty mask gives 0."""
    if mask is None:
        return values.mean()
    keep = mask[:, None, :, None, None].expand_as(values)
    if not keep.any():
        return values.sum() * 0
    return values[keep].mean()


def dmd_generator_loss(x0: torch.Tensor, real: torch.Tensor, fake: torch.Tensor,
                       mask: torch.Tensor | None = None, weights: list[float] | None = None) -> torch.Tensor:
    """DMD (eq. 7-8, Self-Forcing's form), float64. x0 [B, C, F, H, W] carries the generator's
    graph; real / fake are the score networks' x0 at x_t (no gradient):
        grad = (fake - real) / mean|x0 - real|  (per sample, over all frames), nan/inf -> 0
        loss = 0.5 * mean(w_b (x0 - (x0 - grad).detach())^2) over the masked frames
    weights: w_b per sample, plain numbers (Re-DMD); None: 1."""
    x = x0.double()
    real, fake = real.detach().double(), fake.detach().double()
    normaliser = (x.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    grad = (fake - real) / normaliser
    grad = torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))
    target = (x - grad).detach()
    squared = (x - target) ** 2
    if weights is not None:
        squared = squared * torch.tensor(weights, dtype=torch.float64)[:, None, None, None, None]
    return 0.5 * masked_mean(squared, mask)


def critic_flow_loss(fake_x0: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, sigma,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """The critic's flow-matching loss: its flow at x_t = add_noise(x0, eps, sigma), computed
    from its x0 prediction, regressed on eps - x0 (x0 detached generator samples):
        mean(((x_t - fake_x0) / sigma - (eps - x0))^2) over the masked frames."""
    x0 = x0.detach()
    x_t = add_noise(x0, eps, sigma)
    v = flow_from_x0(x_t, fake_x0, sigma)
    return masked_mean((v - (eps - x0)) ** 2, mask)


def sid_generator_loss(x0: torch.Tensor, real: torch.Tensor, fake: torch.Tensor, alpha: float,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """SiD (Self-Forcing's form), float64: real / fake are the scores' x0 at x_t and DO carry
    gradients (x_t is made from x0 with gradient); the normaliser mean|x0 - real| per sample
    is detached:
        loss = mean((real - fake) ((real - x0) - alpha (real - fake)) / normaliser), nan -> 0."""
    x, real, fake = x0.double(), real.double(), fake.double()
    normaliser = (x - real).detach().abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    per = (real - fake) * ((real - x) - alpha * (real - fake)) / normaliser
    per = torch.where(torch.isfinite(per), per, torch.zeros_like(per))
    return masked_mean(per, mask)


# ---------------------------------------------------------------------- the codec
@torch.no_grad()
def reencode_window_start(codec, x0: torch.Tensor, start: int) -> torch.Tensor:
    """The first-frame re-encode of a rollout longer than the DMD window (Self-Forcing
    model/base.py; Rolling Forcing and LongLive likewise): decode latents [0, start] - every
    latent up to and including the window's first - TOGETHER (a causal video VAE needs the
    temporal context), take the LAST decoded pixel frame, encode it alone (a clip's first
    latent is encoded from a single frame). -> the latent [B, C, 1, H, W] that replaces the
    window's first latent. x0 [B, C, total, H, W]; start > 0 is the window's first frame.
    The decoded pixels are clamped to [-1, 1], as Wan's VAE decode does."""
    pixels = codec.decode(x0[:, :, :start + 1].detach())[:, :, -1:].clamp(-1, 1)
    return codec.encode(pixels).to(x0.dtype)
