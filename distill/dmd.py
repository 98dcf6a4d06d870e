"""Distribution-matching losses: DMD (generator), the critic's flow-matching loss, and SiD.

Pure functions over tensors and score callables, so they run without a DiT; recipes build
the callables from CausalDiT with `x0_predictor`.

    score(x_t [B, C, F, H, W], sigma [B] or [B, F]) -> x0 prediction [B, C, F, H, W]

`real_score` is the frozen teacher WITH classifier-free guidance and the negative prompt,
`fake_score` the trainable critic without guidance; both bidirectional. Every "real" / "fake"
below is an x0 prediction (a clean-latent estimate), never a flow or an epsilon.

Guidance convention (forcelab everywhere): x0 = uncond + guidance * (cond - uncond). The
public Self-Forcing / CausVid configs write cond + w * (cond - uncond); that is
guidance = w + 1 (Self-Forcing w = 3.0 -> guidance 4.0; see `guidance_from_cond_form`).
CFG on x0 equals CFG on the flow: x0 = x_t - sigma * v is affine in v at fixed (x_t, sigma).

Timesteps t in [0, 1000] (sigma = t / 1000), one per sample by default, drawn with
train.timesteps.ScoreTimesteps (shift 5, clamped to [20, 980]) unless given. The DMD and the
critic loss use the same draw (independent samples). Frame masks are bool [B, F]: frames
outside the mask get no gradient and are left out of the mean.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..models.rollout import denoise_window
from ..models.schedule import add_noise, timestep_to_sigma, v_from_x0
from ..train.flow_matching import flow_matching_loss, frame_weights, masked_mean
from ..train.timesteps import ScoreTimesteps

Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guidance_from_cond_form(w: float) -> float:
    """cond + w (cond - uncond)  ==  uncond + (w + 1) (cond - uncond)."""
    return float(w) + 1.0


def x0_predictor(model, context: torch.Tensor, negative: torch.Tensor | None = None,
                 guidance: float = 1.0) -> Score:
    """A score callable from a bidirectional DiT and a prompt embedding [B, L, text_dim]:
    x0 of uncond + guidance * (cond - uncond) when `negative` is given, else the plain x0
    (the critic). Runs through the rollout engine's `denoise_window` (one CFG implementation)."""
    def score(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return denoise_window(model, x_t, sigma, context, uncond=negative, guidance=guidance)[1]
    return score


# ---------------------------------------------------------------------- shared pieces
def _noise_and_level(x0: torch.Tensor, timestep, noise, draw: ScoreTimesteps, generator):
    """-> (t [B] or [B, F], sigma same, noise [B, C, F, H, W])."""
    t = draw.sample(x0.shape[0], generator=generator).to(x0.device) if timestep is None else timestep
    if noise is None:
        device = x0.device if generator is None else generator.device
        noise = torch.randn(x0.shape, generator=generator, device=device).to(x0.device, x0.dtype)
    return t, timestep_to_sigma(t), noise


def _zero_nonfinite(x: torch.Tensor) -> torch.Tensor:
    """nan_to_num that also maps +-inf to 0: a sample whose normaliser is 0 (x0 equals the
    teacher's x0) gets no gradient instead of a float-max one."""
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _normaliser(x0: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """DMD eq. 8: mean |x0 - real| per sample, [B, 1, 1, 1, 1] (over all frames, masked or not)."""
    return (x0 - real).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True)


# ---------------------------------------------------------------------- losses
def dmd_loss(x0: torch.Tensor, real_score: Score, fake_score: Score, *, timestep: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, mask: torch.Tensor | None = None,
             draw: ScoreTimesteps = ScoreTimesteps(), generator: torch.Generator | None = None,
             weights: torch.Tensor | None = None):
    """DMD generator loss (DMD eq. 7-8, as in Self-Forcing), -> (loss float64 scalar, logs).

    x0 [B, C, F, H, W]: the generator's samples (carrying its graph). No gradient reaches the
    score networks: with x_t = add_noise(x0, noise, t),
        grad = (fake_x0(x_t) - real_x0(x_t)) / mean|x0 - real_x0(x_t)|   (per sample, float64)
        loss = 0.5 * mean(w_b * (x0 - (x0 - grad).detach())^2)          (over masked frames)
    so d loss / d x0 = w_b grad / (number of masked elements). Non-finite grad entries -> 0.
    weights [B]: w_b, the per-sample weights of Re-DMD (distill/reward.py); used as given (a
    weight carrying a graph would put its gradient into the loss: the caller computes them
    without one). None: w_b = 1, the plain loss (no multiply: the same bits as before).
    timestep [B] (or [B, F]) and noise default to a fresh draw. logs: detached scalars."""
    t, sigma, noise = _noise_and_level(x0, timestep, noise, draw, generator)
    with torch.no_grad():
        x_t = add_noise(x0.detach(), noise, sigma)
        real = real_score(x_t, sigma).double()
        fake = fake_score(x_t, sigma).double()
        x0d = x0.detach().double()
        normaliser = _normaliser(x0d, real)
        grad = _zero_nonfinite((fake - real) / normaliser)
    x = x0.double()
    per_element = (x - (x0d - grad)) ** 2
    if weights is not None:
        per_element = per_element * weights.to(per_element.dtype).view(-1, *(1,) * (x.ndim - 1))
    loss = 0.5 * masked_mean(per_element, mask)
    return loss, {"dmd_grad_abs_mean": grad.abs().mean(), "dmd_normaliser_mean": normaliser.mean(),
                  "dmd_timestep_mean": t.float().mean()}


def critic_loss(x0: torch.Tensor, fake_score: Score, *, timestep: torch.Tensor | None = None,
                noise: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                draw: ScoreTimesteps = ScoreTimesteps(), generator: torch.Generator | None = None):
    """The critic's (fake score's) flow-matching loss on detached generator samples x0
    [B, C, F, H, W], -> (loss float32 scalar, logs):
        x_t = add_noise(x0, noise, t);  v = (x_t - fake_x0(x_t)) / sigma
        loss = mean((v - (noise - x0))^2)   over masked frames  (= mean((x0 - fake_x0)^2 / sigma^2))
    Minimised by the exact x0 predictor E[x0 | x_t] of the generator's distribution."""
    x0 = x0.detach()
    t, sigma, noise = _noise_and_level(x0, timestep, noise, draw, generator)
    x_t = add_noise(x0, noise, sigma).float()
    v = v_from_x0(x_t, fake_score(x_t.to(x0.dtype), sigma).float(), sigma)
    loss = flow_matching_loss(v, x0, noise, mask)
    return loss, {"critic_timestep_mean": t.float().mean()}


def sid_loss(x0: torch.Tensor, real_score: Score, fake_score: Score, *, alpha: float = 1.0,
             timestep: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             mask: torch.Tensor | None = None, draw: ScoreTimesteps = ScoreTimesteps(),
             generator: torch.Generator | None = None):
    """SiD generator loss (score identity distillation), -> (loss float64 scalar, logs).

    Gradients flow through x_t = add_noise(x0, noise, t) into BOTH score networks (no
    stop-gradient); with real, fake = x0 predictions at x_t (real guided):
        loss = mean((real - fake) * ((real - x0) - alpha * (real - fake)) / mean|x0 - real|)
    the normaliser per sample and detached (as DMD's); non-finite entries -> 0. alpha = 1 in
    Self-Forcing's SiD config (the SiD paper uses 1.2). Frames outside `mask` enter x_t
    detached, so no gradient reaches them even through attention across frames. The
    critic's parameters receive gradients too: the recipe steps only the generator here."""
    t, sigma, noise = _noise_and_level(x0, timestep, noise, draw, generator)
    w = frame_weights(mask, x0)
    x_in = x0 if w is None else torch.where(w.bool(), x0, x0.detach())
    x_t = add_noise(x_in, noise, sigma)
    real = real_score(x_t, sigma).double()
    fake = fake_score(x_t, sigma).double()
    x = x0.double()
    with torch.no_grad():
        normaliser = _normaliser(x, real)
    per_element = _zero_nonfinite((real - fake) * ((real - x) - alpha * (real - fake)) / normaliser)
    loss = masked_mean(per_element, mask)
    return loss, {"sid_score_gap_abs_mean": (real - fake).detach().abs().mean(),
                  "sid_normaliser_mean": normaliser.mean(), "sid_timestep_mean": t.float().mean()}
