"""The causal pretraining recipes, one training step each, written out plainly: diffusion
forcing (an independent level per chunk, block-causal), teacher forcing (each noisy chunk
conditioned on the CLEAN earlier chunks), AR-Diffusion (non-decreasing per-frame levels from
the FoPP walk or the forward-only walk). All regress the flow v = eps - x0 (MSE, every frame).

Causal attention is written as a loop over chunks: chunk c's output comes from a
BIDIRECTIONAL forward over the frames it may see, [0, end of c). That is the block-causal
forward only for a ONE-layer DiT (deeper, an earlier frame's state would see later frames of
the prefix), so these references require num_layers == 1; they share no code with the
attention layouts (block-causal, [clean | noisy]) they check.

Raw draws (the recipe's named streams): per sample i, ctx.stream("levels").generator(i) gives
the levels' uniforms (diffusion forcing: torch.rand(1, chunks) in float64; AR-Diffusion: the
walk's randint / rand calls in order), stream "noise" the noise, stream "caption_dropout" the
caption dropout.
"""

from __future__ import annotations

import torch

from .primitives import add_noise, shift_sigma

LEVELS, NOISE, CAPTION_DROPOUT = "levels", "noise", "caption_dropout"     # the recipes' stream names


# ---------------------------------------------------------------------- attention by prefixes
def causal_flow_by_prefixes(model, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, unit: int,
                            clean: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """v [B, C, F, H, W] of x at timesteps t [B, F] under causal attention over units of
    `unit` frames: unit c sees units 0 .. c. With `clean` [B, C, F, H, W] (teacher forcing)
    unit c sees the CLEAN frames of units < c (at t = 0) and its own noisy frames. window:
    unit c sees only the last `window` frames up to its end (a contiguous run of frames, so the
    forward over just those frames has the same relative RoPE positions)."""
    assert model.config.num_layers == 1, "the prefix loop is the causal forward only for one layer"
    F = x.shape[2]
    out = []
    for lo in range(0, F, unit):
        hi = min(lo + unit, F)
        first = 0 if window is None else max(0, hi - window)
        if clean is None:
            xs, ts = x[:, :, first:hi], t[:, first:hi]
        else:
            xs = torch.cat([clean[:, :, first:lo], x[:, :, lo:hi]], dim=2)
            ts = torch.cat([torch.zeros_like(t[:, first:lo]), t[:, lo:hi]], dim=1)
        out.append(model(xs, ts, context)[:, :, lo - first:])
    return torch.cat(out, dim=2)


def drop_captions(trainer, context, ctx, prob: float):
    """Each sample's prompt becomes the negative prompt with probability prob (CFG training)."""
    if prob <= 0:
        return context
    drop = ctx.stream(CAPTION_DROPOUT).uniform(()) < prob
    negative = trainer.negative.expand(context.shape[0], -1, -1)
    return torch.where(drop[:, None, None], negative, context)


def flow_mse(v: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return ((v.float() - (eps - x0).float()) ** 2).mean()


# ---------------------------------------------------------------------- diffusion forcing
def chunk_timesteps(ctx, batch: int, frames: int, chunk: int, shift: float = 1.0,
                    distribution: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0):
    """t [B, F] float32: per sample, every chunk its own level u (uniform, or sigmoid of a
    normal: logit-normal), t = 1000 shift(u), constant over the chunk's frames."""
    chunks = -(-frames // chunk)
    rows = []
    for i in range(batch):
        g = ctx.stream(LEVELS).generator(i)
        if distribution == "uniform":
            u = torch.rand(1, chunks, generator=g, dtype=torch.float64)[0]
        else:
            u = torch.sigmoid(logit_mean + logit_std * torch.randn(1, chunks, generator=g, dtype=torch.float64)[0])
        rows.append([1000 * shift_sigma(float(u[c]), shift) for c in range(chunks) for _ in range(chunk)][:frames])
    return torch.tensor(rows, dtype=torch.float64).clamp(0, 1000).float()


def diffusion_forcing_loss(trainer, batch, ctx, chunk: int, teacher_forcing: bool = False, shift: float = 1.0,
                           distribution: str = "uniform", uncond_prob: float = 0.0,
                           window: int | None = None) -> torch.Tensor:
    x0, model = batch["latent"], trainer.module("generator")
    B, _, F = x0.shape[:3]
    t = chunk_timesteps(ctx, B, F, chunk, shift, distribution)
    eps = ctx.stream(NOISE).normal(x0.shape[1:])
    context = drop_captions(trainer, batch["text_emb"], ctx, uncond_prob)
    x_t = add_noise(x0, eps, t / 1000)
    v = causal_flow_by_prefixes(model, x_t, t, context, chunk, clean=x0 if teacher_forcing else None,
                                window=window)
    return flow_mse(v, x0, eps)


# ---------------------------------------------------------------------- AR-Diffusion
def completion_counts(frames: int, levels: int) -> list[list[int]]:
    """mat_s[t][f]: non-decreasing completions t_f = t <= t_{f+1} <= ... <= t_{F-1} < T
    (exact integers, the paper's recursion)."""
    m = [[0] * frames for _ in range(levels)]
    for t in range(levels - 1, -1, -1):
        for f in range(frames - 1, -1, -1):
            m[t][f] = 1 if f == frames - 1 or t == levels - 1 else m[t + 1][f] + m[t][f + 1]
    return m


def prefix_counts(frames: int, levels: int) -> list[list[int]]:
    """mat_e[t][f]: non-decreasing prefixes t_0 <= ... <= t_f = t (the mirror recursion)."""
    m = [[0] * frames for _ in range(levels)]
    for t in range(levels):
        for f in range(frames):
            m[t][f] = 1 if f == 0 or t == 0 else m[t - 1][f] + m[t][f - 1]
    return m


def pick(weights: dict[int, int], u: float) -> int:
    """Inverse CDF over the allowed levels (ascending) with P proportional to the integer
    weights: the first level whose cumulative share exceeds u ~ U[0, 1)."""
    total, cum = sum(weights.values()), 0
    for level in sorted(weights):
        cum += weights[level]
        if cum / total > u:
            return level
    return max(weights)


def fopp_levels(g: torch.Generator, frames: int, levels: int) -> list[int]:
    """FoPP: f* ~ U{0..F-1}, t* ~ U{0..T-1}; backward t_f <= t_{f+1} weighted by mat_e, then
    forward t_f >= t_{f-1} weighted by mat_s (one uniform per frame, in that order)."""
    suffix, prefix = completion_counts(frames, levels), prefix_counts(frames, levels)
    f_star = int(torch.randint(0, frames, (1,), generator=g))
    seq = [None] * frames
    seq[f_star] = int(torch.randint(0, levels, (1,), generator=g))
    for f in range(f_star - 1, -1, -1):
        u = float(torch.rand(1, 1, generator=g, dtype=torch.float64))
        seq[f] = pick({t: prefix[t][f] for t in range(0, seq[f + 1] + 1)}, u)
    for f in range(f_star + 1, frames):
        u = float(torch.rand(1, 1, generator=g, dtype=torch.float64))
        seq[f] = pick({t: suffix[t][f] for t in range(seq[f - 1], levels)}, u)
    return seq


def forward_levels(g: torch.Generator, frames: int, levels: int) -> list[int]:
    """Uniform over all non-decreasing sequences: t_0 weighted by mat_s[., 0], then forward."""
    suffix = completion_counts(frames, levels)
    seq = [pick({t: suffix[t][0] for t in range(levels)}, float(torch.rand(1, 1, generator=g, dtype=torch.float64)))]
    for f in range(1, frames):
        u = float(torch.rand(1, 1, generator=g, dtype=torch.float64))
        seq.append(pick({t: suffix[t][f] for t in range(seq[-1], levels)}, u))
    return seq


def ar_diffusion_loss(trainer, batch, ctx, num_levels: int, sampler: str = "fopp", shift: float = 1.0,
                      unit: int = 1, uncond_prob: float = 0.0) -> torch.Tensor:
    """Levels per unit of `unit` frames, non-decreasing; level l -> sigma = shift((l + 1) / T)
    (forcelab's mapping: the last level is pure noise); flow-matching MSE."""
    x0, model = batch["latent"], trainer.module("generator")
    B, _, F = x0.shape[:3]
    walk = fopp_levels if sampler == "fopp" else forward_levels
    units = -(-F // unit)
    rows = []
    for i in range(B):
        seq = walk(ctx.stream(LEVELS).generator(i), units, num_levels)
        rows.append([shift_sigma((seq[k] + 1) / num_levels, shift) for k in range(units) for _ in range(unit)][:F])
    sigma = torch.tensor(rows, dtype=torch.float64).float()
    eps = ctx.stream(NOISE).normal(x0.shape[1:])
    context = drop_captions(trainer, batch["text_emb"], ctx, uncond_prob)
    x_t = add_noise(x0, eps, sigma)
    v = causal_flow_by_prefixes(model, x_t, sigma * 1000, context, unit)
    return flow_mse(v, x0, eps)
