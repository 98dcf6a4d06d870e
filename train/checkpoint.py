"""Training checkpoints: written atomically, kept last-K, resumed exactly.

    run_dir/checkpoint-000006/
        generator/, critic/          each trainable role: a DiT directory (config.json + safetensors),
                                     readable by CausalDiT.from_pretrained and diffusers
        generator_ema/               the EMA weights, when kept
        optim-generator.pt           optimizer + LR schedule state (torch.save; loaded weights_only)
        rng-rank0.pt, ...            every rank's RNG states and recipe state
        trainer_state.json           step, data position, counters (written last)
        config.yaml                  the resolved config

Every rank's small state is gathered to rank 0, which writes the folder through
fsio.atomic_directory: a killed save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..fsio import atomic_directory, remove_directory, written_by_forcelab
from ..models.checkpoint import save_state
from ..models.run_folder import CHECKPOINT_PREFIX, EMA_SUFFIX, TRAINER_STATE, checkpoints
from .roles import Role


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"{CHECKPOINT_PREFIX}{step:06d}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, roles: dict[str, Role], trainer_state: dict,
                    rank_states: list[dict], config_yaml: str, keep_last: int, snapshots: dict | None = None) -> Path:
    """Rank 0 only: write checkpoint-{step} atomically, then drop checkpoints beyond keep_last.
    snapshots: per trainable role, the full weights / EMA / optimizer state a sharded run
    gathered (train/parallel.py); None: taken from the roles as they are."""
    path = checkpoint_dir(run_dir, step)
    with atomic_directory(path, overwrite=True) as tmp:
        for name, role in roles.items():
            if not role.trainable:
                continue
            if snapshots is not None:
                snap = snapshots[name]
                weights, ema, optim = snap.weights, snap.ema, snap.optimizer
            else:
                weights, ema = role.module, role.ema_module() if role.ema is not None else None
                optim = {"optimizer": role.optimizer.state_dict(), "scheduler": role.scheduler.state_dict(),
                         "updates": role.updates}
            save_state(weights, tmp / name)
            if ema is not None:
                save_state(ema, tmp / (name + EMA_SUFFIX))
            torch.save(optim, tmp / f"optim-{name}.pt")
        for rank, state in enumerate(rank_states):
            torch.save(state, tmp / f"rng-rank{rank}.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
    for old in checkpoints(run_dir)[:-keep_last]:
        if written_by_forcelab(old):
            remove_directory(old)
    return path


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """`latest` -> the newest complete checkpoint of run_dir (None if there is none yet);
    a path -> that checkpoint (a run folder means its newest)."""
    if resume == "latest":
        found = checkpoints(run_dir) if Path(run_dir).is_dir() else []
        return found[-1] if found else None
    p = Path(resume).expanduser()
    if (p / TRAINER_STATE).is_file():
        return p
    found = checkpoints(p) if p.is_dir() else []
    if not found:
        raise CheckpointError(f"--resume {resume}: not a training checkpoint (no {TRAINER_STATE}) "
                              f"nor a run folder with one; use --resume latest or a checkpoint-NNNNNN folder")
    return found[-1]


def read_trainer_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / TRAINER_STATE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: unreadable {TRAINER_STATE} ({e})") from None


def load_role_state(ckpt: Path, role: Role, strategy=None) -> None:
    """Optimizer, schedule, update count and EMA of a trainable role (its weights are loaded
    when the role is built). strategy (train/parallel.py) loads a sharded role's optimizer
    state and EMA."""
    path = ckpt / f"optim-{role.name}.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt}: no optimizer state for role '{role.name}' ({path.name})")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if strategy is not None:
        strategy.load_optimizer(role, state["optimizer"])
    else:
        role.optimizer.load_state_dict(state["optimizer"])
    role.scheduler.load_state_dict(state["scheduler"])
    role.updates = int(state["updates"])
    ema_dir = ckpt / (role.name + EMA_SUFFIX)
    if ema_dir.is_dir():
        from safetensors.torch import load_file

        from ..models.checkpoint import diffusers_to_wan, weight_files
        ema = {}
        for f in weight_files(ema_dir):
            ema.update({diffusers_to_wan(k): v for k, v in load_file(str(f)).items()})
        if strategy is not None:
            strategy.load_ema(role, ema)
        else:
            params = dict(role.module.named_parameters())
            role.ema = {k: ema[k].to(params[k].device, torch.float32) for k in params}


def load_rank_state(ckpt: Path, rank: int) -> dict:
    path = ckpt / f"rng-rank{rank}.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt}: no state for rank {rank} ({path.name}); it was written by "
                              f"fewer processes - resume with the same number of processes")
    return torch.load(path, map_location="cpu", weights_only=True)
