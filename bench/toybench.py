"""ToyBench throughput: scoring ground-truth toy clips, frames per second of one CPU thread.

    python bench/toybench.py                        # 8 scenes x 16 and 160 frames (1x and 10x a training clip)
    python bench/toybench.py --frames 64 --scenes 4

Frames where balls touch cost most (the occlusion refinement re-renders them), so the rate
depends on the scenes; the bench reports it per clip length, with the ground truth's scores.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from forcelab.data.toyworld import ToyWorld, make_caption
from forcelab.eval.toybench import METRICS, score_video


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, nargs="+", default=[16, 160])
    p.add_argument("--scenes", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)
    world = ToyWorld()
    for frames in args.frames:
        clips = [world.clip(seed, frames=frames) for seed in range(args.scenes)]
        t0 = time.perf_counter()
        scores = [score_video(c.video.permute(0, 2, 3, 1).numpy(), make_caption(c.scene.colors, c.scene.speed))
                  for c in clips]
        seconds = time.perf_counter() - t0
        mean = {m: float(np.nanmean([s[m] for s in scores])) for m in METRICS}
        print(f"{frames:4d} frames x {args.scenes} scenes: {args.scenes * frames / seconds:7.1f} frames/s  "
              + "  ".join(f"{m}={v:.4g}" for m, v in mean.items()))


if __name__ == "__main__":
    main()
