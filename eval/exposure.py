"""Exposure bias, measured directly: one causal student, one noise, two contexts.

    student = load_student("runs/sf", window_frames=6, sink_frames=2)       # model, plan, encoders
    result = measure_exposure(student, scenes=16, chunks=12)
    result["gap"]["psnr"]["per_chunk"]           # self-conditioned minus teacher-forced, k = 1..K

A causal video model trained with ground-truth context (teacher forcing, diffusion forcing)
conditions on its OWN chunks at inference; exposure bias is the loss that this costs. For each
held-out toy scene (seeds HELD_OUT_SCENES, HELD_OUT_SCENES + 1, ...) and each chunk
k = 1..K (`unit` latent frames each), the student generates chunk k twice:

- teacher-forced: the cache holds the GROUND TRUTH of chunks < k: the toy world's clip, encoded
  with the codec and committed chunk by chunk exactly as the rollout commits its own chunks
  (rollout.commit_context: the plan's context timestep and context noise);
- self-conditioned: the ordinary rollout; the cache holds the student's own chunks < k.

Both modes draw the same noise (rollout.Noise, seeded by the scene), so chunk 1 (no context)
is the same in both and from there on the only difference is the context.

prefix P >= 1 (a continuation): both modes are given the ground truth of chunks 1..P (the
self-conditioned rollout continues from there on its own). Needed where the scene holds state
that the caption does not name (the textured world's background): without it the
self-conditioned rollout invents that state at chunk 1 and can only keep its own invention.

Scores of chunk k in each mode (higher is better):
- psnr: PSNR (dB, capped at toybench.PSNR_CAP) of the decoded chunk against the ground-truth
  frames. It asks for the ground truth's own trajectory: a lawful continuation that moves
  elsewhere scores low, so it is read together with the next three.
- adherence, identity, physics: ToyBench's frame metrics (toybench.frame_metrics) of the video
  the student saw and made up to chunk k (its context frames, then chunk k), averaged over
  chunk k's frames. They need no particular trajectory. identity refers to the balls of the
  video's first training-clip-length frames, as in ToyBench; physics at chunk k's frames uses
  the context frames before them (a chunk that does not continue its context's motion fails)
  and no frame after them: it is averaged over the frames whose stencil (frames t-1 .. t+2)
  touches the chunk, the last context frame included (a 2-frame chunk: the context frame's
  acceleration and change of step, and the chunk's first frame's acceleration).
- background: background persistence (eval/persistence.py): PSNR (dB, capped) of chunk k's
  background pixels (away from the true balls and not ball-coloured) against the scene's true
  background. In the textured toy world (ToyWorldConfig.background_texture) the background is
  state that only the context carries, so a gap that grows with k is error that compounds.

Per metric: gap[k] = self-conditioned - teacher-forced per scene; its mean over scenes per k
with a bootstrap 95% interval over scenes; its level (mean over k) and its least-squares slope
over k (per chunk), each per scene, then the mean and a bootstrap interval; both over the
chunks with context that differ between the modes (k >= 2 and k > P). Exposure bias shows as
a negative gap; compounding errors as a gap that grows more negative with k (negative slope).

The toy codec only (temporal stride 1: a latent frame is a video frame) and the chunk-wise
plan (chunk k is finished before chunk k + 1 starts, so "the context of chunk k" is defined).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..data.toyworld import HELD_OUT_SCENES, ToyWorld, ToyWorldConfig, parse_caption
from ..errors import ForcelabError
from ..models.plans import Chunkwise
from ..models.rollout import Noise, cache_options, causal_stream, commit_context, make_cache, set_prompt
from . import stats
from .persistence import background_image, background_psnr, free_pixels
from .toybench import PSNR_CAP, frame_metrics

MODES = ("teacher_forced", "self_conditioned")
METRICS = ("psnr", "adherence", "identity", "physics", "background")
MAX_SCENES = 10_000            # scenes in one measurement (each is two rollouts)


@dataclass
class Student:
    """What a measurement needs of a causal student."""
    model: object                  # CausalDiT
    plan: Chunkwise                # its sampling plan (window and sink included)
    codec: object                  # VideoAutoencoder (toy: temporal stride 1)
    text_encoder: object
    name: str = "student"

    @property
    def unit(self) -> int:
        """Latent frames per chunk."""
        return self.plan.unit_frames(cache_options(self.plan, self.model.config)[0])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_student(path, plan: Chunkwise | None = None, window_frames: int | None = None,
                 sink_frames: int | None = None, device="cpu", cache_policy: str | None = None) -> Student:
    """A student from a forcelab run folder (its generator, EMA when kept; its recipe's sampling
    plan) or a DiT directory (plan: given, default Chunkwise()). window_frames / sink_frames
    replace the plan's (0: no window), cache_policy its cache policy (models/cache_policy.py)."""
    from ..generate.sources import resolve_model
    from ..models.autoencoder import load_autoencoder
    from ..models.dit import CausalDiT
    from ..models.text_encoder import load_text_encoder
    from ..run_folder import is_run, recorded_encoders

    dit_dir, _ = resolve_model(path)
    if plan is None:
        plan = _run_plan(path) if is_run(path) else Chunkwise()
    if window_frames is not None:
        plan = replace(plan, window_frames=window_frames)
    if sink_frames is not None:
        plan = replace(plan, sink_frames=sink_frames)
    if cache_policy is not None:
        plan = replace(plan, cache_policy=cache_policy)
    encoders = recorded_encoders(dit_dir) or {"vae": "toy", "text_encoder": "toy"}
    model = CausalDiT.from_pretrained(dit_dir, dtype=torch.float32, device=torch.device(device)).eval()
    return Student(model, plan, load_autoencoder(encoders["vae"], device=device),
                   load_text_encoder(encoders["text_encoder"], device=device), name=str(path))


def _config_file(path):
    """A run folder's (or its checkpoint folder's run's) config.yaml, or None."""
    from pathlib import Path

    run = Path(path)
    config = run / "config.yaml" if (run / "config.yaml").is_file() else run.parent / "config.yaml"
    return config if config.is_file() else None


def _run_config(path):
    """A run folder's training config (its config.yaml)."""
    from ..train.config import load_train_config

    config = _config_file(path)
    if config is None:
        raise ForcelabError(f"model {path}: no config.yaml in the run folder, so its sampling plan is unknown; "
                            f"give the DiT directory and a plan")
    return load_train_config([config])


def _run_plan(path) -> Chunkwise:
    """The sampling plan of a run folder's recipe."""
    from ..train.recipe import recipe_class

    cfg = _run_config(path)
    return recipe_class(cfg.recipe).sampling_plan(cfg.algo)


def run_world(path, background_texture: float | None = None) -> ToyWorld:
    """The toy world a student is measured in: the given texture amplitude, else the run
    folder's data.background_texture (the world it was trained on), else the plain world."""
    if background_texture is None:
        background_texture = _run_config(path).data.background_texture if _config_file(path) else 0.0
    return ToyWorld(ToyWorldConfig(background_texture=background_texture))


def check_counts(chunks: int, scenes: int) -> None:
    """Bad counts, before anything is loaded: one line naming them."""
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 2:
        raise ForcelabError(f"exposure: chunks must be an integer >= 2 (chunk 1 has no context), got {chunks!r}")
    if isinstance(scenes, bool) or not isinstance(scenes, int) or not 1 <= scenes <= MAX_SCENES:
        raise ForcelabError(f"exposure: scenes must be an integer in [1, {MAX_SCENES}], got {scenes!r}")


def check_student(student: Student, chunks: int, scenes: int) -> None:
    """Bad input, before any rollout: one line naming it."""
    check_counts(chunks, scenes)
    if not isinstance(student.plan, Chunkwise):
        raise ForcelabError(f"exposure: the {student.plan.name} plan does not finish a chunk before the next "
                            f"starts (a bidirectional clip, or chunks overlapping in denoising), so the context "
                            f"of a chunk is not defined; measure a causal student with the chunkwise plan")
    cache_options(student.plan, student.model.config)          # window, sink and chunk agree
    if student.codec.temporal_stride != 1:
        raise ForcelabError(f"exposure: autoencoder {student.codec.name} compresses time (stride "
                            f"{student.codec.temporal_stride}); the measurement needs the toy codec (a latent "
                            f"frame per video frame)")


# ---------------------------------------------------------------------- the two rollouts
@torch.no_grad()
def self_conditioned(student: Student, context: torch.Tensor, noise: Noise, frames: int) -> torch.Tensor:
    """The ordinary rollout: latents [B, C, frames, h, w]."""
    chunks = causal_stream(student.model, student.plan, context, noise, frames)
    return torch.cat([c.x for c in chunks], dim=2)


@torch.no_grad()
def teacher_forced(student: Student, context: torch.Tensor, noise: Noise, truth: torch.Tensor,
                   recompute: bool = False, forced_frames: int | None = None) -> tuple[torch.Tensor, object]:
    """Chunk k generated against the ground truth of chunks < k: truth [B, C, F, h, w] clean
    latents -> (latents [B, C, F, h, w], the cache, holding the committed truth). A chunk's own
    commit is undone (the cache's state before it is restored) and the truth committed in its
    place, so that a window's ring never drops a ground-truth frame for a generated one.
    recompute: the FrameCache reference instead of the KV cache. forced_frames: only the chunks
    that start before it are replaced by the truth (None: all); later chunks keep their own
    commit, as in the ordinary rollout (a continuation of a ground-truth prefix)."""
    model, plan, unit = student.model, student.plan, student.unit
    B, _, frames, h, w = truth.shape
    cache = make_cache(model, plan, B, h, w, frames, recompute)
    set_prompt(model, cache, context)
    out = []
    for f0 in range(0, frames, unit):
        forced = forced_frames is None or f0 < forced_frames
        state = _snapshot(cache) if forced else None
        chunk = next(causal_stream(model, plan, None, noise, unit, cache=cache, start_frame=f0))
        out.append(chunk.x)
        if not forced:
            continue
        _restore(cache, state)
        commit_context(model, plan, cache, noise, truth[:, :, f0:f0 + unit].to(noise.dtype), f0)
    return torch.cat(out, dim=2), cache


def _snapshot(cache):
    if hasattr(cache, "state_dict"):
        return cache.state_dict()
    return cache.x, cache.t                       # FrameCache: commits replace, never mutate


def _restore(cache, state) -> None:
    if hasattr(cache, "load_state_dict"):
        cache.load_state_dict(state)
    else:
        cache.x, cache.t = state


# ---------------------------------------------------------------------- scores
def to_frames(latents: torch.Tensor, codec) -> np.ndarray:
    """Decoded latents [B, C, F, h, w] -> uint8 [B, F, H, W, 3]."""
    pixels = codec.decode(latents).float()
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 frames a against b (capped at PSNR_CAP)."""
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return min(PSNR_CAP, 10 * math.log10(255.0 ** 2 / mse)) if mse > 0 else PSNR_CAP


def score_chunks(made: np.ndarray, seen: np.ndarray, truth: np.ndarray, caption: str, unit: int,
                 config: ToyWorldConfig, background: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """One scene, one mode: metric -> [K] over chunks. made: the chunks generated, uint8
    [F, H, W, 3]; seen: the context frames that mode gave (the truth for teacher-forced, made
    itself for self-conditioned); truth: the ground-truth frames; background: the scene's true
    background [H, W, 3] and its free pixels [F, H, W] (persistence.free_pixels)."""
    colors, speed = parse_caption(caption)
    chunks = made.shape[0] // unit
    out = {m: np.full(chunks, np.nan) for m in METRICS}
    for k in range(chunks):
        lo, hi = k * unit, (k + 1) * unit
        out["psnr"][k] = psnr(made[lo:hi], truth[lo:hi])
        out["background"][k] = background_psnr(made[lo:hi], background[0], background[1][lo:hi])
        video = np.concatenate([seen[:lo], made[lo:hi]])
        per_frame = frame_metrics(video, colors, speed, config, reference_frames=config.frames)
        for m in ("adherence", "identity"):
            out[m][k] = stats.nanmean(per_frame[m][lo:hi])
        out["physics"][k] = stats.nanmean(per_frame["physics"][max(lo - 1, 0):hi])   # every stencil touching the chunk
    return out


# ---------------------------------------------------------------------- the measurement
def ground_truth(world: ToyWorld, seeds: list[int], frames: int, codec,
                 device=None) -> tuple[np.ndarray, torch.Tensor, list[str]]:
    """(frames uint8 [B, F, H, W, 3], latents [B, C, F, h, w], captions) of the scenes."""
    clips = [world.clip(s, frames) for s in seeds]
    video = torch.stack([c.video for c in clips])                                  # [B, F, 3, H, W]
    pixels = video.float().div(127.5).sub(1.0).permute(0, 2, 1, 3, 4)              # [B, 3, F, H, W]
    with torch.no_grad():
        latents = codec.encode(pixels.to(device)).float()
    return video.permute(0, 1, 3, 4, 2).numpy(), latents, [c.scene.caption for c in clips]


def true_backgrounds(world: ToyWorld, seeds: list[int], frames: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per scene: its true background [H, W, 3] and the pixels no true ball is near [F, H, W]."""
    c = world.config
    clips = [world.clip(s, frames) for s in seeds]
    return [(background_image(world, clip.scene), free_pixels(clip.positions, clip.scene.radius, (c.height, c.width)))
            for clip in clips]


def measure_exposure(student: Student, scenes: int = 16, chunks: int = 12, first_scene: int = HELD_OUT_SCENES,
                     batch: int = 8, world: ToyWorld | None = None, prefix: int = 0) -> dict:
    """Both modes on `scenes` held-out scenes (seeds first_scene ..), `chunks` chunks each,
    both given the ground truth of the first `prefix` chunks.
    -> {"chunks", "unit", "scenes", "plan", "modes": {mode: {metric: [K] mean}}, "gap": {metric:
    {"per_chunk" [K], "ci95" [K] (lo, hi), "mean", "mean_ci95", "slope", "slope_ci95"}}, "per_scene":
    {mode: {metric: [N][K]}}}."""
    check_student(student, chunks, scenes)
    check_prefix(prefix, chunks)
    world = world or ToyWorld()
    unit, frames = student.unit, chunks * student.unit
    seeds = list(range(first_scene, first_scene + scenes))
    per_scene = {mode: {m: [] for m in METRICS} for mode in MODES}
    for b0 in range(0, scenes, batch):
        part = seeds[b0:b0 + batch]
        truth_frames, truth, captions = ground_truth(world, part, frames, student.codec, student.device)
        backgrounds = true_backgrounds(world, part, frames)
        context = student.text_encoder.encode(captions)[0].to(truth.device)
        h, w = truth.shape[-2:]
        noise = Noise(part, truth.shape[1], h, w, device=truth.device)
        made = {"teacher_forced": teacher_forced(student, context, noise, truth)[0],
                "self_conditioned": (self_conditioned(student, context, noise, frames) if prefix == 0 else
                                     teacher_forced(student, context, noise, truth, forced_frames=prefix * unit)[0])}
        for mode, latents in made.items():
            video = to_frames(latents, student.codec)
            for i, caption in enumerate(captions):
                seen = truth_frames[i] if mode == "teacher_forced" else \
                    np.concatenate([truth_frames[i][:prefix * unit], video[i][prefix * unit:]])
                scores = score_chunks(video[i], seen, truth_frames[i], caption, unit, world.config, backgrounds[i])
                for m in METRICS:
                    per_scene[mode][m].append(scores[m])
    header = {"model": student.name, "plan": student.plan.describe(), "unit": unit, "chunks": chunks,
              "first_scene": first_scene, "prefix": prefix}
    return summarize(per_scene, header)


def summarize(per_scene: dict, header: dict) -> dict:
    """Means per mode and chunk; the gap per chunk with bootstrap intervals over scenes, and over
    the chunks with context (k >= 2; chunk 1 is the same in both modes by construction, and
    counting its zero would tilt the slope): its level (mean) and its growth (slope per chunk,
    per scene, then the mean), each with a bootstrap interval. header: what the result records
    of the measurement (model, plan, unit, chunks, first_scene, prefix: the ground-truth chunks
    both modes were given, whose gap is 0 by construction and is left out likewise)."""
    first = first_scored(header.get("prefix", 0))
    modes = {mode: {m: _column_means(np.array(v)) for m, v in d.items()} for mode, d in per_scene.items()}
    gap = {}
    for m in METRICS:
        g = np.array(per_scene["self_conditioned"][m]) - np.array(per_scene["teacher_forced"][m])   # [N, K]
        levels = np.array([stats.nanmean(row[first:]) for row in g])
        slopes = np.array([stats.slope(row[first:]) for row in g])
        gap[m] = {"per_chunk": _column_means(g),
                  "ci95": [list(stats.bootstrap_ci(g[:, k])) for k in range(g.shape[1])],
                  "mean": stats.nanmean(levels), "mean_ci95": list(stats.bootstrap_ci(levels)),
                  "slope": stats.nanmean(slopes), "slope_ci95": list(stats.bootstrap_ci(slopes))}
    scenes = len(next(iter(per_scene["teacher_forced"].values())))
    return {"kind": "exposure", **header, "scenes": scenes, "metrics": list(METRICS), "modes": modes, "gap": gap,
            "per_scene": {mode: {m: np.array(v).tolist() for m, v in d.items()} for mode, d in per_scene.items()}}


def first_scored(prefix: int) -> int:
    """Index of the first chunk the gap's level and slope count: the first after the prefix,
    and never chunk 1 (no context: the same in both modes)."""
    return max(prefix, 1)


def check_prefix(prefix: int, chunks: int) -> None:
    if isinstance(prefix, bool) or not isinstance(prefix, int) or not 0 <= prefix <= chunks - 2:
        raise ForcelabError(f"exposure: prefix must be an integer in [0, chunks - 2 = {chunks - 2}] (two chunks "
                            f"after it give a slope), got {prefix!r}")


def _column_means(a: np.ndarray) -> list[float]:
    return [stats.nanmean(a[:, k]) for k in range(a.shape[1])]


def markdown(result: dict) -> str:
    """A table: per chunk k, each mode's means and the gap with its interval, per metric."""
    prefix = result.get("prefix", 0)
    k0 = first_scored(prefix) + 1
    lines = [f"{result['model']}: {result['scenes']} scenes x {result['chunks']} chunks of {result['unit']} "
             f"latent frames, ground-truth prefix {prefix} chunks; gap = self-conditioned - teacher-forced", "",
             "| metric | " + " | ".join(f"k={k + 1}" for k in range(result["chunks"]))
             + f" | mean k>={k0} [95% CI] | slope/chunk k>={k0} [95% CI] |",
             "|---|" + "---|" * (result["chunks"] + 2)]
    for m in result["metrics"]:
        g = result["gap"][m]
        cells = " | ".join(f"{v:+.3f}" for v in g["per_chunk"])
        (mlo, mhi), (lo, hi) = g["mean_ci95"], g["slope_ci95"]
        lines.append(f"| {m} gap | {cells} | {g['mean']:+.3f} [{mlo:+.3f}, {mhi:+.3f}] | "
                     f"{g['slope']:+.4f} [{lo:+.4f}, {hi:+.4f}] |")
    for mode in MODES:
        for m in result["metrics"]:
            cells = " | ".join(f"{v:.3f}" for v in result["modes"][mode][m])
            lines.append(f"| {m} {mode} | {cells} | | |")
    return "\n".join(lines)


RESULT_NAME = "exposure.json"


def run_exposure(model, out, *, scenes: int = 16, chunks: int = 12, window_frames: int | None = None,
                 sink_frames: int | None = None, first_scene: int = HELD_OUT_SCENES, batch: int = 8,
                 device="cpu", background_texture: float | None = None, prefix: int = 0,
                 cache_policy: str | None = None) -> dict:
    """`forcelab eval exposure`: measure a run folder or DiT directory in its world (run_world);
    write OUT/exposure.json (measure_exposure's result) and OUT/exposure.md (the table)."""
    import json
    from pathlib import Path

    from ..fsio import write_text_atomic
    from ..validate import parse_device

    check_counts(chunks, scenes)
    check_prefix(prefix, chunks)
    student = load_student(model, window_frames=window_frames, sink_frames=sink_frames, device=parse_device(device),
                           cache_policy=cache_policy)
    check_student(student, chunks, scenes)
    world = run_world(model, background_texture)
    result = measure_exposure(student, scenes=scenes, chunks=chunks, first_scene=first_scene, batch=batch,
                              world=world, prefix=prefix)
    result["background_texture"] = world.config.background_texture
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / RESULT_NAME, json.dumps(result, indent=2, allow_nan=True) + "\n")
    write_text_atomic(folder / "exposure.md", markdown(result) + "\n")
    return result
