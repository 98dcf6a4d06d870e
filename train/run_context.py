"""What a recipe may use of the run it is part of: the trainer builds one RunContext and hands
it to the recipe, which never sees the trainer itself.

    run.model("critic")             the role's module for training (wrapped for the parallel strategy)
    run.module("teacher")           the role's plain CausalDiT (config, caches, frozen use)
    run.sampling_module()           the generator's weights for sampling (its EMA when kept)
    run.trainable("critic"), run.source("teacher")   how the role was built
    run.codec, run.text_encoder, run.negative        the encoders, the negative prompt [1, L, D]
    run.device, run.rank, run.world, run.is_main, run.dry_run
    run.run_dir, run.resume_from                     the run folder, the checkpoint resumed (or None)
    run.barrier()                                    wait for every process
    run.data_stream("prompts")                       a stream of the configured data source for a kind
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch


@dataclass(frozen=True)
class RunContext:
    roles: Mapping[str, object]                     # name -> train.roles.Role
    sampling: Callable[[str], torch.nn.Module]      # role -> its sampling weights (EMA / gathered copy)
    codec: object
    text_encoder: object
    negative: torch.Tensor                          # the negative prompt's embedding [1, L, D]
    device: torch.device
    rank: int
    world: int
    dry_run: bool
    run_dir: Path
    resume_from: Path | None
    barrier: Callable[[], None]
    data_stream: Callable[[str], object]            # data kind -> a stream of the configured source

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def model(self, role: str) -> torch.nn.Module:
        return self.roles[role].model

    def module(self, role: str):
        return self.roles[role].module

    def sampling_module(self, role: str = "generator"):
        return self.sampling(role)

    def trainable(self, role: str) -> bool:
        return self.roles[role].trainable

    def source(self, role: str) -> str:
        """Where the role's weights came from (a folder, `random:<preset>`, `resume:<checkpoint>`)."""
        return self.roles[role].source
