"""What one update of a role runs, as the memory planner (train/memory_plan.py) needs it.

A recipe states it with `Recipe.workload(cfg, chunk)`: for each trainable role, the DiT passes
of one micro-step (which model, how many query and key frames, with or without gradients)
and the KV cache its rollout keeps. Frame counts are latent frames; the batch is a multiple
of data.batch_size (2 for a CFG pass that stacks cond and uncond).

    {"critic": Workload([ModelPass("generator", 2, 8, grad=False, cached=True),
                         ModelPass("critic", 8, 8, grad=True)], cache_frames=10)}
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelPass:
    role: str                   # the model that runs (generator, critic, teacher)
    frames: int                 # query frames of the pass
    keys: int                   # key frames it attends to (its own and cached ones)
    grad: bool                  # builds a graph that lives until the backward
    batch: int = 1              # x data.batch_size (2: cond and uncond stacked for CFG)
    masked: bool = False        # a block-causal / windowed layout (the torch backend builds its mask)
    cached: bool = False        # reads the KV cache (its keys and values are concatenated per block)
    count: int = 1              # passes of this shape (grad: all their graphs live together)


@dataclass
class Workload:
    passes: list[ModelPass]
    cache_frames: int = 0       # capacity of the rollout's KV cache, in frames (0: no cache)
    cache_role: str = "generator"


def cache_capacity(frames: int, chunk: int, window: int | None, sink: int) -> int:
    """Frames a KV cache holds (models/kv_cache.py): without a window every frame plus the
    staging chunk, with one the sink and the window (whose last chunk is the staging slots)."""
    return frames + chunk if not window else sink + window


def chunk_keys(start: int, chunk: int, window: int | None, sink: int) -> int:
    """Key frames of a chunk pass at frame `start` against a cache: the visible past (a window
    counts the chunk itself; the sink is added) and the chunk."""
    if not window:
        return start + chunk
    return min(start, window - chunk) + chunk + min(sink, max(0, start - (window - chunk)))


def rollout_passes(role: str, frames: int, chunk: int, steps: int, grad_from: int,
                   window: int | None = None, sink: int = 0) -> list[ModelPass]:
    """A chunk-wise few-step rollout of `frames` frames (models/rollout.py): per chunk `steps`
    denoising passes and one commit, all without gradients except the exit pass of each chunk
    at or after frame `grad_from` (the DMD window)."""
    out: list[ModelPass] = []
    for start in range(0, frames, chunk):
        keys = chunk_keys(start, chunk, window, sink)
        with_grad = start >= grad_from
        out.append(ModelPass(role, chunk, keys, grad=False, cached=True, count=steps + 1 - with_grad))
        if with_grad:
            out.append(ModelPass(role, chunk, keys, grad=True, cached=True))
    return out


@dataclass
class DMDWorkload:
    """The DMD family's two updates from its student rollout (ModelPass lists) and window."""
    rollout: list[ModelPass]
    window: int                         # frames the scores judge
    cache_frames: int = 0
    extra: list[ModelPass] = field(default_factory=list)   # other passes of both updates

    def updates(self) -> dict[str, Workload]:
        scores = [ModelPass("teacher", self.window, self.window, grad=False, batch=2),
                  ModelPass("critic", self.window, self.window, grad=False)]
        no_grad_rollout = [ModelPass(p.role, p.frames, p.keys, grad=False, batch=p.batch, masked=p.masked,
                                     cached=p.cached, count=p.count) for p in self.rollout]
        return {"generator": Workload(self.rollout + self.extra + scores, self.cache_frames),
                "critic": Workload(no_grad_rollout + self.extra +
                                   [ModelPass("critic", self.window, self.window, grad=True)], self.cache_frames)}
