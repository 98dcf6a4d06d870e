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

A resume is verified before it trains (verify_checkpoint): the trainer state, recipe, roles,
world size, each role's architecture and every state file; each failure is one line naming
the file and what to do.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import CheckpointError
from ..fsio import atomic_directory, os_error_message, remove_directory, written_by_forcelab
from ..models.checkpoint import diffusers_to_wan, read_config, save_state, weight_files
from ..run_folder import CHECKPOINT_PREFIX, EMA_SUFFIX, TRAINER_STATE, checkpoints
from .roles import RUNTIME_FIELDS, Role, _norm


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
    try:
        _write(path, roles, trainer_state, rank_states, config_yaml, snapshots)
    except OSError as e:   # a full disk, a read-only folder: the earlier checkpoints are intact
        raise CheckpointError(f"{os_error_message(e, 'checkpoint', path)}; then continue with "
                              f"--resume latest") from None
    for old in checkpoints(run_dir)[:-keep_last]:
        if old.is_symlink():
            raise CheckpointError(f"checkpoint {old}: a symbolic link (to {old.resolve()}), met while removing "
                                  f"old checkpoints; forcelab does not delete through links - move it out of "
                                  f"{Path(run_dir).name} (or raise checkpoint.keep_last), then --resume latest")
        if written_by_forcelab(old):
            try:
                remove_directory(old)
            except OSError as e:
                raise CheckpointError(f"{os_error_message(e, 'old checkpoint', old)}") from None
    return path


def _write(path: Path, roles: dict[str, Role], trainer_state: dict, rank_states: list[dict], config_yaml: str,
           snapshots: dict | None) -> None:
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
        (tmp / "config.yaml").write_text(config_yaml)   # tmp: a fresh folder of this save
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")


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


RESUME_ADVICE = "resume from an earlier checkpoint (--resume RUN/checkpoint-NNNNNN) or start a new run"


def read_trainer_state(ckpt: Path) -> dict:
    """The checkpoint's trainer_state.json: a JSON object with whole-number step and micro_batches."""
    path = ckpt / TRAINER_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); {RESUME_ADVICE}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a trainer state (a JSON {type(state).__name__}, not an object); "
                              f"{RESUME_ADVICE}")
    for key in ("step", "micro_batches"):
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{path}: lacks a whole-number '{key}' (got {value!r}); {RESUME_ADVICE}")
    return state


def _load(path: Path, what: str, keys: tuple[str, ...]) -> dict:
    """A torch.save'd dict of the checkpoint (weights only), with `keys`; else one clear line."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing ({what}); {RESUME_ADVICE}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # truncated or foreign bytes: pickle, zip and torch raise their own errors
        raise CheckpointError(f"{path}: damaged or truncated {what} ({type(e).__name__}); {RESUME_ADVICE}") from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a forcelab {what} (no {missing}); {RESUME_ADVICE}")
    return state


def verify_checkpoint(ckpt: Path, *, recipe: str, world: int, trainable: dict) -> dict:
    """Everything a resume from `ckpt` will read, checked before any of it is used (rank 0).

    trainable: each role this run trains -> the DiTConfig it expects. Returns the trainer state."""
    ckpt = Path(ckpt)
    state = read_trainer_state(ckpt)
    where = ckpt / TRAINER_STATE
    if state.get("recipe") != recipe:
        raise CheckpointError(f"checkpoint {ckpt}: written by recipe '{state.get('recipe')}', this run is "
                              f"'{recipe}'; start a new run with init from it instead")
    if state.get("world_size") != world:
        raise CheckpointError(f"checkpoint {ckpt}: written by {state.get('world_size')} process(es); resume with "
                              f"the same number (this run has {world})")
    roles = state.get("roles")
    if not isinstance(roles, dict):
        raise CheckpointError(f"{where}: lacks its 'roles'; {RESUME_ADVICE}")
    theirs = sorted(n for n, r in roles.items() if isinstance(r, dict) and r.get("trainable"))
    if theirs != sorted(trainable):
        raise CheckpointError(f"checkpoint {ckpt}: trains role(s) {theirs}, this run trains {sorted(trainable)}; "
                              f"resume with the roles of the config that wrote it ({ckpt / 'config.yaml'})")
    for name, expected in trainable.items():
        found, _ = read_config(ckpt / name)
        clash = [f"{k} {getattr(found, k)!r} (config {getattr(expected, k)!r})"
                 for k in expected.__dataclass_fields__ if k not in RUNTIME_FIELDS
                 and _norm(getattr(found, k)) != _norm(getattr(expected, k))]
        if clash:
            raise CheckpointError(f"{ckpt / name}: a model of another architecture than this run's "
                                  f"({', '.join(clash)}); resume with the config that wrote it "
                                  f"({ckpt / 'config.yaml'}), or start a new run with roles.{name}.init={ckpt}")
        _load(ckpt / f"optim-{name}.pt", f"optimizer state of role '{name}'", ("optimizer", "scheduler", "updates"))
    for rank in range(world):
        rs = _load(ckpt / f"rng-rank{rank}.pt", f"RNG state of rank {rank}", ("rng",))
        rng = rs["rng"]
        if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) \
                or not isinstance(rng.get("python"), list):
            raise CheckpointError(f"{ckpt / f'rng-rank{rank}.pt'}: not a forcelab RNG state; {RESUME_ADVICE}")
    return state


def _check_optimizer_fits(path: Path, saved: dict, role: Role) -> None:
    """An optimizer state of another model (other sizes or parameter count) would load without a
    word and fail, or worse, train, later: its parameters must match the role's, in order."""
    try:
        ids = [i for g in saved["param_groups"] for i in g["params"]]
        per_param = saved["state"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{path}: not a torch optimizer state; {RESUME_ADVICE}") from None
    params = role.params
    if len(ids) != len(params) or any(
            isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(p.shape)
            for i, p in zip(ids, params) for v in (per_param.get(i) or {}).values()):
        raise CheckpointError(f"{path}: the optimizer state of another model ({len(ids)} parameters, the role "
                              f"'{role.name}' has {len(params)} of other shapes); {RESUME_ADVICE}")


def load_role_state(ckpt: Path, role: Role, strategy) -> None:
    """Optimizer, schedule, update count and EMA of a trainable role (its weights are loaded
    when the role is built), put in place by the run's strategy (train/parallel.py)."""
    path = ckpt / f"optim-{role.name}.pt"
    state = _load(path, f"optimizer state of role '{role.name}'", ("optimizer", "scheduler", "updates"))
    if not strategy.sharded:   # a sharded strategy keys its state by name
        _check_optimizer_fits(path, state["optimizer"], role)
    try:
        strategy.load_optimizer(role, state["optimizer"])
        role.scheduler.load_state_dict(state["scheduler"])
        role.updates = int(state["updates"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: does not fit this run's optimizer ({type(e).__name__}: {e}); "
                              f"{RESUME_ADVICE}") from None
    ema_dir = ckpt / (role.name + EMA_SUFFIX)
    if ema_dir.is_dir():
        ema = {}
        for f in weight_files(ema_dir):
            try:
                ema.update({diffusers_to_wan(k): v for k, v in load_file(str(f)).items()})
            except Exception as e:   # safetensors raises its own error classes
                raise CheckpointError(f"{f}: cannot read the EMA weights ({e}); {RESUME_ADVICE}") from None
        missing = sorted(set(dict(role.module.named_parameters())) - set(ema))
        if missing:
            raise CheckpointError(f"{ema_dir}: EMA weights lack {missing[:3]}; {RESUME_ADVICE}")
        strategy.load_ema(role, ema)


def load_rank_state(ckpt: Path, rank: int) -> dict:
    path = ckpt / f"rng-rank{rank}.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt}: no state for rank {rank} ({path.name}); it was written by "
                              f"fewer processes - resume with the same number of processes")
    return _load(path, f"RNG state of rank {rank}", ("rng",))


# ---------------------------------------------------------------------- after a non-finite abort
def last_good_checkpoint(run_dir: Path, failing_step: int) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose weights are finite and whose loss was: the step after it
    (the first computed with its weights) logged finite losses and no skipped update. A
    checkpoint can hold finite weights that are already ruined (lr=1e30: weights ~1e30, the
    next loss inf), so the weights alone do not tell. failing_step: the step aborting now (not
    logged). A step missing from metrics.jsonl is judged by the weights alone.
    Returns (that checkpoint or None, why each newer one is not good)."""
    rows: dict[int, dict] = {}
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    for line in lines:
        try:
            row = json.loads(line)
            rows[int(row["step"])] = row      # a step logged twice (a resumed run): the later row
        except (ValueError, KeyError, TypeError):
            continue
    rejected = []
    for ckpt in reversed(checkpoints(run_dir)):
        after = int(ckpt.name[len(CHECKPOINT_PREFIX):]) + 1
        row = rows.get(after)
        if not _weights_finite(ckpt):
            rejected.append(f"{ckpt.name} has non-finite weights")
        elif after >= failing_step or row is not None and (any(k.endswith("/skipped") for k in row) or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for k, v in row.items() if k.endswith("/loss"))):
            rejected.append(f"the loss went non-finite right after {ckpt.name}")
        else:
            return ckpt, rejected
    return None, rejected


def _weights_finite(ckpt: Path) -> bool:
    try:
        for role_dir in sorted(d for d in ckpt.iterdir() if (d / "config.json").is_file()):
            for f in weight_files(role_dir):
                with safe_open(str(f), framework="pt", device="cpu") as h:
                    for key in h.keys():
                        t = h.get_tensor(key)
                        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                            return False
    except Exception:   # unreadable (safetensors raises its own errors): not one to recommend
        return False
    return True
