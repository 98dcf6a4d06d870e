"""What a recipe's loss knows of its micro-step: the step, the micro-step, the role, and named
random streams tied to each sample's global position.

    noise = ctx.stream("noise").normal(x0.shape[1:])                    # [B, *shape], per sample
    t = ctx.stream("sigma").per_sample(sample_flow_timesteps, shift=3.0)  # a sampler per sample
    exit_step = ctx.stream("exit_step").shared_int(4)                   # the same on every rank
    seeds = ctx.stream("rollout_noise").seeds()                         # for the rollout's Noise

A stream's values depend only on (run seed, stream name, the sample's position) - shared
draws on (run seed, name, step, micro-step) - so a run does not depend on how samples are
spread over processes and accumulation steps, and two streams with different names never
share numbers (forcelab.seeds hashes the name into the seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..seeds import stream_seed

SHARED = -1         # the position slot of draws shared by every sample and rank (positions are >= 0)


@dataclass
class StepContext:
    """Per-micro-batch context: step index, micro-step, and per-sample randomness."""
    step: int
    micro: int
    seed: int
    positions: list[int]                 # global sample positions of this rank's batch
    device: torch.device
    role: str = ""

    def stream(self, name: str) -> "Stream":
        """The random stream `name` of this micro-batch."""
        return Stream(self, name)


@dataclass(frozen=True)
class Stream:
    """One named random stream of a micro-batch (see the module docstring)."""
    ctx: StepContext
    name: str

    def seed(self, i: int) -> int:
        """Sample i's seed of this stream (depends on its global position, not on i)."""
        return stream_seed(self.ctx.seed, self.name, self.ctx.positions[i])

    def seeds(self) -> list[int]:
        """Every sample's seed, in batch order (e.g. for the rollout engine's Noise)."""
        return [self.seed(i) for i in range(len(self.ctx.positions))]

    def generator(self, i: int) -> torch.Generator:
        """A fresh generator for sample i (for samplers that take a generator)."""
        return torch.Generator().manual_seed(self.seed(i))

    def per_sample(self, fn, *args, **kwargs) -> torch.Tensor:
        """fn(1, *args, generator=g_i, **kwargs) for each sample i with its own generator (a draw
        from forcelab.train.timesteps), concatenated along the batch."""
        return torch.cat([fn(1, *args, generator=self.generator(i), **kwargs)
                          for i in range(len(self.ctx.positions))]).to(self.ctx.device)

    def normal(self, shape) -> torch.Tensor:
        """Gaussian [B, *shape]: sample i's values depend only on (seed, name, position_i)."""
        out = torch.stack([torch.randn(shape, generator=self.generator(i)) for i in range(len(self.ctx.positions))])
        return out.to(self.ctx.device)

    def uniform(self, shape) -> torch.Tensor:
        """U[0, 1) [B, *shape], per sample like normal()."""
        out = torch.stack([torch.rand(shape, generator=self.generator(i)) for i in range(len(self.ctx.positions))])
        return out.to(self.ctx.device)

    def shared_int(self, high: int) -> int:
        """An integer in [0, high) that is the same on every rank (depends on step and micro-step)."""
        g = torch.Generator().manual_seed(stream_seed(self.ctx.seed, self.name, SHARED, self.ctx.step, self.ctx.micro))
        return torch.randint(high, (), generator=g).tolist()   # a host generator's draw: no device read
