"""Rolling Forcing, one training step written out plainly (Rolling Forcing paper; the recipe
notes in the reference): no rollout engine, no KV cache, no recipe module.

Per rollout (draws shared by every process):
    chunks  = min_chunks + U{0 .. max_chunks - min_chunks}           (public: {7, 8, 9})
    exit    ~ U{0 .. S - 1}                                          (S = len(steps))
    rolling ~ Bernoulli(rolling_prob)                                (public: 50/50 with chunk-wise)

Rolling: S chunks in flight, chunk u sits at level i - u at iteration i (the oldest at the
lowest noise); one forward denoises all of them, every chunk is re-noised to its next level,
the chunk that reached level S is committed (a clean pass at context_noise) and leaves,
a pure-noise chunk enters. Iterations i with i % S == exit carry gradient: every chunk is in
flight for S consecutive iterations, so those windows tile the video and each frame's output
is the x0 of its own gradient pass, at whatever level it sat there. Chunk-wise (plain
Self-Forcing): per chunk, the denoising list until the exit step, whose x0 is both the
output and the committed context.

Attention: each chunk sees `window` frames back from the end of its own chunk plus the first
`sink` frames. The sink uses true-distance RoPE here ("adjacent" sink RoPE, the public
re-rotation, cannot be written as one cache-less forward). DMD judges the last `frames`
frames; when the video is longer, the window's first latent is re-encoded (decode the
latents up to it together, encode the last pixel frame alone) and its chunk is left out of
the generator's loss. The critic trains on its own rollout (all window frames).

The helpers below (the student's forward after a committed context, the DMD and critic
step) serve the other reference recipes of this folder too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .primitives import (add_noise, causal_chunk_forward, critic_flow_loss, dmd_generator_loss, guided_x0,
                         predict_x0, reencode_window_start, score_timestep, sigma_from_t, timestep_input,
                         warp_steps, x0_from_flow)

# the recipes' named random streams (StepContext.stream)
GENERATOR_DRAWS = ("dmd_timestep", "dmd_noise")            # the generator loss's score timestep, its noise
CRITIC_DRAWS = ("critic_timestep", "critic_noise")         # ... the critic loss's
CHUNKS_DRAW, EXIT_DRAW, PLAN_DRAW = "chunk_count", "exit_step", "rolling_plan"   # shared draws of a rollout
ROLLOUT_NOISE = "rollout_noise"              # the rollout's per-sample noise seeds
PROB_RESOLUTION = 1 << 20                    # the raw integer behind the Bernoulli(rolling_prob) draw
INITIAL, CONTEXT = 0, -1                     # Noise draws: starting noise, context noise (re-noise: level)


# ---------------------------------------------------------------------- the student's forward
def student_flow(model, past: torch.Tensor | None, past_t: float, x: torch.Tensor, sigma: torch.Tensor,
                 context: torch.Tensor, chunk: int, window: int | None, sink: int) -> torch.Tensor:
    """The flow v [B, C, n, H, W] of frames x [B, C, n, H, W] at levels sigma [B, n], right
    after the committed frames past [B, C, p, H, W] (their clean-pass inputs, all at
    timestep past_t): one block-causal forward over [past | x] (window + sink), keeping the
    last n frames, the past a detached context (primitives.causal_chunk_forward)."""
    B, n = x.shape[0], x.shape[2]
    past_ts = None if past is None else torch.full((B, past.shape[2]), float(past_t))
    return causal_chunk_forward(model, past, past_ts, x, timestep_input(sigma, B, n), context, chunk, window, sink)


def clean_pass_inputs(clean: torch.Tensor, first_frame: int, noise, context_noise: float) -> torch.Tensor:
    """What the clean pass feeds the DiT for committed frames: the clean latents, re-noised to
    context_noise with the context-noise draw of each frame when context_noise > 0."""
    if context_noise <= 0:
        return clean
    eps = noise(first_frame, clean.shape[2], CONTEXT)
    return add_noise(clean, eps, sigma_from_t(context_noise))


# ---------------------------------------------------------------------- the scores
@dataclass
class Scores:
    """What the DMD step needs besides the generator's clip."""
    teacher: torch.nn.Module            # real score, bidirectional, frozen
    critic: torch.nn.Module             # fake score, bidirectional, trainable
    negative: torch.Tensor              # [1, L, D] the negative prompt (the teacher's uncond)
    guidance: float = 4.0               # uncond + guidance (cond - uncond)
    shift: float = 5.0                  # the score timestep draw: shift ...
    t_min: float = 20.0                 # ... clamped to [t_min, t_max]
    t_max: float = 980.0
    snap_shift: float | None = None     # snap the drawn timestep to the shifted 1000-entry table (public: 5)


def score_draws(ctx, x0: torch.Tensor, draws: tuple[str, str], scores: Scores):
    """(sigma [B], eps [B, C, F, H, W]): per sample, the raw k ~ U{0..999} of its own
    generator of stream draws[0] (its position) through the shifted, clamped (and optionally
    snapped) law; eps from stream draws[1]."""
    ts = []
    for i in range(len(ctx.positions)):
        k = int(torch.randint(0, 1000, (1,), generator=ctx.stream(draws[0]).generator(i)))
        ts.append(score_timestep(k, scores.shift, scores.t_min, scores.t_max, scores.snap_shift))
    eps = ctx.stream(draws[1]).normal(x0.shape[1:]).to(x0.dtype)
    return sigma_from_t(torch.tensor(ts, dtype=torch.float32)), eps


def distribution_matching(role: str, x0: torch.Tensor, mask: torch.Tensor, context: torch.Tensor, ctx,
                          scores: Scores) -> torch.Tensor:
    """generator: DMD on x0 (carrying the generator's graph) with the guided teacher as the
    real score and the critic as the fake; critic: its flow-matching loss on detached x0."""
    if role == "generator":
        sigma, eps = score_draws(ctx, x0, GENERATOR_DRAWS, scores)
        with torch.no_grad():
            x_t = add_noise(x0.detach(), eps, sigma)
            real = guided_x0(scores.teacher, x_t, sigma, context, scores.negative, scores.guidance)
            fake = predict_x0(scores.critic, x_t, sigma, context)
        return dmd_generator_loss(x0, real, fake, mask)
    sigma, eps = score_draws(ctx, x0, CRITIC_DRAWS, scores)
    x0 = x0.detach()
    fake = predict_x0(scores.critic, add_noise(x0, eps, sigma), sigma, context)
    return critic_flow_loss(fake, x0, eps, sigma, mask)


# ---------------------------------------------------------------------- Rolling Forcing
@dataclass
class RollingOptions:
    steps: list[float] = field(default_factory=lambda: [1000.0, 800.0, 600.0, 400.0, 200.0])
    warp_shift: float = 5.0
    frames: int = 21                    # the DMD window (the teacher's horizon)
    min_chunks: int = 7
    max_chunks: int = 7
    chunk: int = 3
    window: int | None = None           # attention window incl. the chunk (None: everything)
    sink: int = 0
    context_noise: float = 0.0
    rolling_prob: float = 0.5
    reencode_first: bool = True


def draw_rollout(ctx, o: RollingOptions) -> tuple[int, int, bool]:
    """(chunks, exit step, rolling?) from the raw shared integers of this step."""
    S = len(o.steps)
    chunks = o.min_chunks + ctx.stream(CHUNKS_DRAW).shared_int(o.max_chunks - o.min_chunks + 1)
    exit_step = ctx.stream(EXIT_DRAW).shared_int(S)
    rolling = ctx.stream(PLAN_DRAW).shared_int(PROB_RESOLUTION) < round(o.rolling_prob * PROB_RESOLUTION)
    return chunks, exit_step, rolling


def rolling_rollout(model, context, noise, chunks: int, exit_step: int, grad_from: int, o: RollingOptions):
    """-> (x0 [B, C, chunks * c, H, W] from each chunk's gradient pass, the committed clean
    latents). Chunk u enters at iteration u and sits at level i - u."""
    S, c = len(o.steps), o.chunk
    sigmas = [sigma_from_t(t) for t in warp_steps(o.steps, o.warp_shift)] + [0.0]
    latent, out, committed = {}, {}, []
    for i in range(S + chunks - 1):
        live = [u for u in range(chunks) if 0 <= i - u < S]
        for u in live:
            if i == u:
                latent[u] = noise(u * c, c, INITIAL)
        x = torch.cat([latent[u] for u in live], dim=2)
        sigma = torch.tensor([sigmas[i - u] for u in live for _ in range(c)])[None].expand(x.shape[0], -1)
        gradient_pass = i % S == exit_step
        keep = [gradient_pass and u * c >= grad_from for u in live]
        past = torch.cat(committed, dim=2) if committed else None
        with torch.set_grad_enabled(any(keep) and torch.is_grad_enabled()):
            past_in = None if past is None else clean_pass_inputs(past, 0, noise, o.context_noise)
            v = student_flow(model, past_in, o.context_noise, x, sigma, context, c, o.window, o.sink)
            x0 = x0_from_flow(x, v, sigma)
        for k, u in enumerate(live):
            x0_u = x0[:, :, k * c:(k + 1) * c]
            if gradient_pass:
                out[u] = x0_u if keep[k] else x0_u.detach()
            level = i - u
            if level + 1 < S:           # re-noise to the next level with this frame's fresh draw
                latent[u] = add_noise(x0_u.detach(), noise(u * c, c, level + 1), sigmas[level + 1])
            else:                       # finished: the oldest chunk leaves and is committed
                del latent[u]
                committed.append(x0_u.detach())
    return torch.cat([out[u] for u in range(chunks)], dim=2), torch.cat(committed, dim=2)


def chunkwise_rollout(model, context, noise, chunks: int, exit_step: int, grad_from: int, o: RollingOptions):
    """Plain Self-Forcing: chunk by chunk, the denoising list until the exit step."""
    S, c = len(o.steps), o.chunk
    sigmas = [sigma_from_t(t) for t in warp_steps(o.steps, o.warp_shift)] + [0.0]
    out, committed = [], []
    for u in range(chunks):
        x = noise(u * c, c, INITIAL)
        past = torch.cat(committed, dim=2) if committed else None
        for j in range(S):
            sigma = torch.full((x.shape[0], c), sigmas[j])
            with torch.set_grad_enabled(j == exit_step and u * c >= grad_from and torch.is_grad_enabled()):
                past_in = None if past is None else clean_pass_inputs(past, 0, noise, o.context_noise)
                v = student_flow(model, past_in, o.context_noise, x, sigma, context, c, o.window, o.sink)
                x0 = x0_from_flow(x, v, sigma)
            if j == exit_step:          # the chunk stops here: output and context
                out.append(x0)
                committed.append(x0.detach())
                break
            x = add_noise(x0.detach(), noise(u * c, c, j + 1), sigmas[j + 1])
    return torch.cat(out, dim=2), torch.cat(committed, dim=2)


def rolling_forcing_loss(role: str, generator, context: torch.Tensor, ctx, noise, codec, scores: Scores,
                         o: RollingOptions) -> torch.Tensor:
    """One loss call of Rolling Forcing for `role` (generator: DMD; critic: flow matching on
    its own no-grad rollout). noise: the rollout's per-frame Gaussian source (Noise)."""
    chunks, exit_step, rolling = draw_rollout(ctx, o)
    total = chunks * o.chunk
    judged = min(o.frames, total)       # the DMD window: the last `frames` frames
    start = total - judged
    run = rolling_rollout if rolling else chunkwise_rollout
    with torch.set_grad_enabled(role == "generator"):
        x0, _ = run(generator, context, noise, chunks, exit_step, start, o)
    mask = torch.ones(x0.shape[0], judged, dtype=torch.bool)
    clip = x0[:, :, start:]
    if start > 0 and o.reencode_first:
        first = reencode_window_start(codec, x0, start)
        clip = torch.cat([first, clip[:, :, 1:]], dim=2)
        if role == "generator":
            mask[:, :o.chunk] = False
    return distribution_matching(role, clip, mask, context, ctx, scores)
