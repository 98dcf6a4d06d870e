"""Reward loaders for Re-DMD (distill/reward.py states the protocol): each is named in a config
as "forcelab.eval.rewards:<loader>", called once with algo.reward.path, and returns

    reward(videos [B, F, 3, H, W] float in [0, 1], captions list[str]) -> rewards float64 [B]

- adherence, physics, adherence_and_physics: ToyBench's own metrics (eval/toybench.py) of the
  decoded frames, against what the toy caption says; the mean of the two for the last. A metric
  with nothing to measure (physics when no ball is seen in three consecutive frames) scores 0:
  a video without a trackable ball has no lawful motion to reward. Toy-world captions only.
- motion: the mean absolute difference of consecutive frames (pixel units of [0, 1]), a
  model-free stand-in for a motion-quality reward model (Reward Forcing rewards motion with
  VideoAlign); it also rewards flicker, so at scale name your reward model instead.
None of them reads a model: their path must be unset.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..data.toyworld import ToyWorldConfig
from ..errors import ForcelabError
from .toybench import score_video

LEVELS = 255                  # ToyBench measures uint8 frames


def _no_model(name: str, path: str | None) -> None:
    if path is not None:
        raise ForcelabError(f"algo.reward.path: the {name} reward reads no model; leave the path unset")


def toy_frames(video: torch.Tensor) -> np.ndarray:
    """[F, 3, H, W] float in [0, 1] -> uint8 [F, H, W, 3], the frames ToyBench scores."""
    return (video.detach().float().clamp(0, 1) * LEVELS).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def toybench_reward(metrics: tuple[str, ...]):
    """The mean of ToyBench's `metrics` per video (NaN -> 0)."""
    def reward(videos: torch.Tensor, captions: list[str]) -> torch.Tensor:
        out = []
        for video, caption in zip(videos, captions):
            frames = toy_frames(video)
            config = ToyWorldConfig(height=frames.shape[1], width=frames.shape[2])
            scores = score_video(frames, caption, config=config)
            out.append(sum(0.0 if math.isnan(scores[m]) else scores[m] for m in metrics) / len(metrics))
        return torch.tensor(out, dtype=torch.float64)
    return reward


def adherence(path: str | None = None):
    """ToyBench adherence: per frame, |seen & captioned| / |seen | captioned| ball colours."""
    _no_model("adherence", path)
    return toybench_reward(("adherence",))


def physics(path: str | None = None):
    """ToyBench physics: the fraction of ball steps moving at constant velocity between wall bounces."""
    _no_model("physics", path)
    return toybench_reward(("physics",))


def adherence_and_physics(path: str | None = None):
    """The mean of ToyBench adherence and physics (the toy configs' reward)."""
    _no_model("adherence_and_physics", path)
    return toybench_reward(("adherence", "physics"))


def motion(path: str | None = None):
    """Mean |frame t+1 - frame t| per video (0 for a single frame)."""
    _no_model("motion", path)

    def reward(videos: torch.Tensor, captions: list[str]) -> torch.Tensor:
        if videos.shape[1] < 2:
            return torch.zeros(videos.shape[0], dtype=torch.float64)
        return (videos[:, 1:] - videos[:, :-1]).abs().flatten(1).mean(1).double()
    return reward
