"""Training checkpoints: written atomically, kept last-K, resumed exactly.

Two formats (checkpoint.format: auto | full | sharded; auto: sharded under FSDP and ZeRO-3, else full):

    run_dir/checkpoint-000006/              format: full (one process, ddp, ZeRO-2; fsdp, zero3 on request)
        generator/, critic/          each trainable role: a DiT directory (config.json + safetensors),
                                     readable by CausalDiT.from_pretrained and diffusers
        generator_ema/               the EMA weights, when kept
        optim-generator.pt           optimizer + LR schedule state (torch.save; loaded weights_only)
        rng-rank0.pt, ...            each rank's RNG states, recipe state (streaming_long's KV
                                     caches), data position, ZeRO partitions: written by that rank
        trainer_state.json           step, data position, counters, format (written last)
        config.yaml                  the resolved config

    run_dir/checkpoint-000006/              format: sharded (torch.distributed.checkpoint)
        sharded/                     .metadata (rank 0) and __R_0.distcp, one file per rank: the
                                     shards that rank holds of every trainable role's weights
                                     (ROLE.model.*), EMA (ROLE.ema.*) and optimizer state (ROLE.optim.*)
        architecture/generator/      each trainable role's config.json (no weights)
        optim-generator.pt           the optimizer's param groups (hyperparameters), the LR
                                     schedule and update count; no tensors of the optimizer
        rng-rank0.pt, ...            as above, each written by its rank
        trainer_state.json, config.yaml

    run_dir/checkpoint-000006/              format: sharded under ZeRO-3 (DeepSpeed's own partitions)
        sharded/zero3-rank0.pt, ...  one file per rank (torch.save, read weights_only): per trainable
                                     role its flat partition of every parameter (ds_tensor, padding
                                     included) and of the EMA (its real elements), with the parameter
                                     names, full shapes, element counts, partition sizes, world size
        architecture/, optim-generator.pt (LR schedule, update count), rng-rank0.pt (the optimizer's
        partitions, as in the full format), trainer_state.json, config.yaml

Nothing is gathered to one process to write a sharded checkpoint: every rank writes its own
shards (a tensor replicated on several ranks is written once) and its own rng-rankR.pt into
one temporary folder, which rank 0 made (fsio.atomic_directory) and moves into place after
every rank reported success, trainer_state.json last: a killed or failed save leaves the
previous checkpoint intact and no partial one under a checkpoint's name. The folder must lie
on a file system every rank sees (as for any resume). In the full format the sharded
strategies gather the weights, EMA (and FSDP's optimizer state) to rank 0, which writes them.

A sharded checkpoint resumes at any number of processes and under any strategy but ZeRO
(torch.distributed.checkpoint reshards on load: each rank reads the parts of the tensors it
holds now). Bit for bit at the same number of processes; at another, the states are the same
full tensors, the data stream continues at the same global sample (`sample_offset`), and what
belongs to one rank alone starts fresh, which the run's log says: RNG states (reseeded from
seed, rank and step), a recipe's per-rank state (streaming_long starts new sequences) and a
shard stream's read count (each rank reads its new split from the start of an epoch).
A ZeRO-3 sharded checkpoint resumes under zero3 at the same number of processes only, bit for
bit (each rank copies its partitions back); any other resume is refused in one line: export it
and start a new run with init from the export.
`forcelab export` turns a sharded checkpoint into DiT directories (train/export.py; ZeRO-3
partitions are concatenated in rank order, the padding dropped, reshaped); generate and
roles.X.init read those, not the shards.

A resume is verified before it trains (verify_checkpoint): the trainer state, recipe, roles,
world size, each role's architecture and every state file; each failure is one line naming
the file and what to do.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import CheckpointError, ConfigError, ForcelabError
from ..fsio import atomic_directory, os_error_message, remove_directory, written_by_forcelab
from ..models.checkpoint import config_to_json, diffusers_to_wan, read_config, save_state, weight_files
from ..run_folder import (ARCHITECTURE_DIR, CHECKPOINT_PREFIX, EMA_SUFFIX, SHARDED_DIR, TRAINER_STATE, checkpoints,
                          is_sharded)
from .roles import RUNTIME_FIELDS, Role, _norm

FORMATS = ("full", "sharded")
ZERO3_PARTITIONS = "zero3"              # a ZeRO-3 sharded checkpoint: per rank, its flat partitions


def partitions_file(ckpt: Path, rank: int) -> Path:
    """Rank `rank`'s file of a ZeRO-3 sharded checkpoint (its partitions of every trainable role)."""
    return Path(ckpt) / SHARDED_DIR / f"{ZERO3_PARTITIONS}-rank{rank}.pt"


def is_partitioned(ckpt: Path) -> bool:
    """A sharded checkpoint written under ZeRO-3 (per-rank partitions, not torch.distributed.checkpoint)."""
    return partitions_file(ckpt, 0).is_file()


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"{CHECKPOINT_PREFIX}{step:06d}"


def checkpoint_format(cfg, strategy) -> str:
    """full | sharded for this run (checkpoint.format; auto: sharded under FSDP and ZeRO-3)."""
    fmt = cfg.checkpoint.format
    if fmt == "auto":
        return "sharded" if strategy.name in ("fsdp", "zero3") else "full"
    if fmt == "sharded" and strategy.name == "zero2":
        raise ConfigError("checkpoint.format=sharded: not written under zero2, whose weights are whole on every "
                          "rank (nothing to gather) and whose optimizer partitions each rank writes already "
                          "(rng-rankR.pt); set checkpoint.format to auto or full, or train with parallel=zero3")
    return fmt


def resharded_position(consumed: int, world: int, batch_size: int) -> tuple[int, int]:
    """(micro_batches, sample_offset) that continue a data stream at global sample `consumed`
    with `world` processes: micro-batch m of rank r reads the batch_size samples from
    sample_offset + (m * world + r) * batch_size on (Trainer.next_batch), so the next samples
    are read by the next ranks in order, none skipped or read twice."""
    return divmod(consumed, world * batch_size)


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


# ---------------------------------------------------------------------- saving (every rank)
def save_checkpoint(run_dir: Path, step: int, roles: dict[str, Role], trainer_state: dict, rank_state: dict,
                    config_yaml: str, keep_last: int, *, rank: int = 0, world: int = 1, snapshots: dict | None = None,
                    shards: dict | None = None) -> Path:
    """Collective: every rank calls it. Writes checkpoint-{step} atomically, then drops
    checkpoints beyond keep_last. rank_state: this rank's own state (rng-rankR.pt).
    shards (sharded format): per trainable role, (the tensors this rank holds by name, the
    optimizer's param groups) from strategy.checkpoint_shards; every rank writes its part.
    snapshots (full format of a sharded strategy): per trainable role, the full weights / EMA /
    optimizer state gathered to rank 0 (train/parallel.py); None: taken from the roles."""
    path = checkpoint_dir(run_dir, step)
    with contextlib.ExitStack() as stack:
        tmp, error = None, None
        if rank == 0:
            try:
                tmp = stack.enter_context(atomic_directory(path, overwrite=True, what="checkpoint"))
                if shards is not None:
                    (tmp / SHARDED_DIR).mkdir()
            except dcp_failures() as e:     # a full disk, a read-only folder, a folder not forcelab's
                error = e
        tmp = Path(_agree(path, error, world, share=None if tmp is None else str(tmp)))
        error = None
        try:
            _write_rank_state(tmp, rank, rank_state)
        except dcp_failures() as e:
            error = e
        _agree(path, error, world)      # (every rank enters the collective write below, or none)
        try:
            tensors = {name: tensors for name, (tensors, _) in (shards or {}).items()}
            if any(ZERO3_PARTITIONS in t for t in tensors.values()):   # ZeRO-3: each rank its own file
                _write_partitions(partitions_file(tmp, rank), {n: t[ZERO3_PARTITIONS] for n, t in tensors.items()})
            elif shards is not None:    # collective: each rank writes the shards it holds (DCP raises on all)
                _write_shards(tmp / SHARDED_DIR, tensors, world)
            if rank == 0:
                _write_roles(tmp, roles, snapshots, shards)
                (tmp / "config.yaml").write_text(config_yaml)   # tmp: a fresh folder of this save
        except dcp_failures() as e:
            error = e
        _agree(path, error, world)      # every rank's part is written (or every rank raises)
        error = None
        if rank == 0:
            try:
                with stack.pop_all():   # trainer_state.json last, then the swap into place
                    (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
                _drop_old(run_dir, keep_last)
            except dcp_failures() as e:
                error = e
    _agree(path, error, world)
    return path


def dcp_failures() -> tuple:
    """What a save or load may raise: exceptions, and torch.distributed.checkpoint's
    CheckpointException (a BaseException carrying each failed rank's exception)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return Exception, CheckpointException


def root_cause(error: BaseException) -> BaseException:
    """The exception behind DCP's CheckpointException (the first failed rank's) and chained
    wrappers: the OSError of a full disk, the FileNotFoundError of a missing shard file."""
    while True:
        failures = getattr(error, "failures", None)
        if isinstance(failures, dict) and failures:
            error = next(iter(failures.values()))[0]
        elif error.__cause__ is not None:
            error = error.__cause__
        else:
            return error


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300]}" if text else type(error).__name__


def _agree(path: Path, error: BaseException | None, world: int, share: str | None = None) -> str | None:
    """Every rank learns whether any rank failed (then all raise the first rank's error, as one
    line) and rank 0's `share` (the temporary folder). Small objects only: no tensors."""
    messages = [_message(path, error)]
    if world > 1:
        messages = [None] * world
        torch.distributed.all_gather_object(messages, (_message(path, error), share))
        share = messages[0][1]
        messages = [m for m, _ in messages]
    failed = next((m for m in messages if m is not None), None)
    if failed is not None:
        raise CheckpointError(failed) from None
    return share


def _message(path: Path, error: BaseException | None) -> str | None:
    if error is None:
        return None
    if isinstance(error, ForcelabError):   # already one line naming the thing (a folder not forcelab's)
        return str(error)
    cause = root_cause(error)
    if isinstance(cause, OSError):   # a full disk, a read-only folder: the earlier checkpoints are intact
        return f"{os_error_message(cause, 'checkpoint', path)}; then continue with --resume latest"
    return f"checkpoint {path}: could not be written ({one_line(cause)}); the earlier checkpoints are intact - " \
           f"continue with --resume latest"


def _write_rank_state(tmp: Path, rank: int, state: dict) -> None:
    """This rank's own file, synced by this rank (on a shared file system rank 0 cannot)."""
    with open(tmp / f"rng-rank{rank}.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _write_partitions(path: Path, roles: dict) -> None:
    """This rank's ZeRO-3 partitions of every trainable role, synced by this rank."""
    with open(path, "wb") as f:
        torch.save(roles, f)
        f.flush()
        os.fsync(f.fileno())


def _write_shards(folder: Path, state: dict, world: int) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():   # one process: DCP says it writes without a process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(folder), no_dist=world == 1)


def _write_roles(tmp: Path, roles: dict[str, Role], snapshots: dict | None, shards: dict | None) -> None:
    """Rank 0: the trainable roles' DiT directories and optimizer files (full format), or
    their architectures and optimizer hyperparameters (sharded format)."""
    for name, role in roles.items():
        if not role.trainable:
            continue
        schedule = {"scheduler": role.scheduler.state_dict(), "updates": role.updates}
        if shards is not None:
            arch = tmp / ARCHITECTURE_DIR / name
            arch.mkdir(parents=True)
            (arch / "config.json").write_text(json.dumps(config_to_json(role.module.config, "diffusers"), indent=2))
            torch.save({"optimizer": {"param_groups": shards[name][1]}, **schedule}, tmp / f"optim-{name}.pt")
            continue
        if snapshots is not None:
            snap = snapshots[name]
            weights, ema, optim = snap.weights, snap.ema, snap.optimizer
        else:
            weights, ema = role.module, role.ema_module() if role.ema is not None else None
            optim = {"optimizer": role.optimizer.state_dict(), **schedule}
        save_state(weights, tmp / name)
        if ema is not None:
            save_state(ema, tmp / (name + EMA_SUFFIX))
        torch.save(optim, tmp / f"optim-{name}.pt")


def _drop_old(run_dir: Path, keep_last: int) -> None:
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
EXPORT_ADVICE = "export an earlier checkpoint of the run (RUN/checkpoint-NNNNNN)"


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


def verify_checkpoint(ckpt: Path, *, recipe: str, world: int, trainable: dict, parallel: str = "ddp") -> dict:
    """Everything a resume from `ckpt` will read, checked before any of it is used (rank 0).

    trainable: each role this run trains -> the DiTConfig it expects; parallel: this run's
    strategy. Returns the trainer state."""
    ckpt = Path(ckpt)
    state = read_trainer_state(ckpt)
    where = ckpt / TRAINER_STATE
    sharded = is_sharded(ckpt)
    if state.get("recipe") != recipe:
        raise CheckpointError(f"checkpoint {ckpt}: written by recipe '{state.get('recipe')}', this run is "
                              f"'{recipe}'; start a new run with init from it instead")
    saved_world = state.get("world_size")
    if sharded and is_partitioned(ckpt):
        if parallel != "zero3" or saved_world != world:
            raise CheckpointError(f"checkpoint {ckpt}: ZeRO-3 partitions of {saved_world} process(es), read back by "
                                  f"parallel=zero3 at that number only (this run: {parallel}, {world}); export it "
                                  f"(forcelab export {ckpt} OUT_DIR), then start a new run with "
                                  f"roles.ROLE.init=OUT_DIR")
        missing = [partitions_file(ckpt, r).name for r in range(world) if not partitions_file(ckpt, r).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {ckpt / SHARDED_DIR}: lacks {missing}; {RESUME_ADVICE}")
    elif sharded and parallel.startswith("zero"):
        raise CheckpointError(f"checkpoint {ckpt}: sharded (torch.distributed.checkpoint), which DeepSpeed "
                              f"({parallel}) does not read; resume with parallel=fsdp or ddp, or start a new run "
                              f"with init from its export (forcelab export {ckpt} OUT_DIR)")
    if not sharded and saved_world != world:
        raise CheckpointError(f"checkpoint {ckpt}: written by {saved_world} process(es); resume with "
                              f"the same number (this run has {world})")
    if sharded and (isinstance(saved_world, bool) or not isinstance(saved_world, int) or saved_world < 1):
        raise CheckpointError(f"{where}: lacks a whole-number 'world_size' (got {saved_world!r}); {RESUME_ADVICE}")
    if sharded and not is_partitioned(ckpt):
        read_shard_index(ckpt)
    roles = state.get("roles")
    if not isinstance(roles, dict):
        raise CheckpointError(f"{where}: lacks its 'roles'; {RESUME_ADVICE}")
    theirs = sorted(n for n, r in roles.items() if isinstance(r, dict) and r.get("trainable"))
    if theirs != sorted(trainable):
        raise CheckpointError(f"checkpoint {ckpt}: trains role(s) {theirs}, this run trains {sorted(trainable)}; "
                              f"resume with the roles of the config that wrote it ({ckpt / 'config.yaml'})")
    for name, expected in trainable.items():
        found, _ = read_config(role_config_dir(ckpt, name))
        clash = [f"{k} {getattr(found, k)!r} (config {getattr(expected, k)!r})"
                 for k in expected.__dataclass_fields__ if k not in RUNTIME_FIELDS
                 and _norm(getattr(found, k)) != _norm(getattr(expected, k))]
        if clash:
            raise CheckpointError(f"{ckpt / name}: a model of another architecture than this run's "
                                  f"({', '.join(clash)}); resume with the config that wrote it "
                                  f"({ckpt / 'config.yaml'}), or start a new run with roles.{name}.init={ckpt}")
        _load(ckpt / f"optim-{name}.pt", f"optimizer state of role '{name}'", ("optimizer", "scheduler", "updates"))
    for rank in range(world if saved_world == world else 0):   # at another world size they start fresh
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


def role_config_dir(ckpt: Path, name: str) -> Path:
    """The folder holding a checkpoint's role's config.json (its DiT directory when full)."""
    return ckpt / ARCHITECTURE_DIR / name if is_sharded(ckpt) else ckpt / name


def read_shard_index(ckpt: Path, advice: str = RESUME_ADVICE):
    """The torch.distributed.checkpoint metadata of a sharded checkpoint (which tensors, which shards)."""
    from torch.distributed.checkpoint import FileSystemReader

    folder = ckpt / SHARDED_DIR
    try:
        return FileSystemReader(folder).read_metadata()
    except Exception as e:   # missing or damaged: DCP raises its own errors
        raise CheckpointError(f"{folder}: unreadable shard index .metadata ({type(e).__name__}); "
                              f"{advice}") from None


def load_shards(ckpt: Path, state: dict, world: int, advice: str = RESUME_ADVICE) -> None:
    """Fill `state` (tensors allocated where this process holds them; nested by role and kind)
    in place from a sharded checkpoint: each process reads the parts it holds (collective when
    world > 1)."""
    import torch.distributed.checkpoint as dcp

    folder = ckpt / SHARDED_DIR
    try:
        with warnings.catch_warnings():   # one process: DCP says it reads without a process group
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=dcp.FileSystemReader(folder), no_dist=world == 1)
    except dcp_failures() as e:   # a missing shard file, a tensor of another shape (DCP's CheckpointException)
        raise CheckpointError(f"{folder}: cannot read the shards ({one_line(root_cause(e))}); "
                              f"{advice}") from None


def load_role_state(ckpt: Path, role: Role, strategy) -> None:
    """Optimizer, schedule, update count and EMA of a trainable role (full format: its weights
    are loaded when the role is built; sharded: they are read here, with the rest), put in
    place by the run's strategy (train/parallel.py)."""
    path = ckpt / f"optim-{role.name}.pt"
    state = _load(path, f"optimizer state of role '{role.name}'", ("optimizer", "scheduler", "updates"))
    if is_partitioned(ckpt):   # ZeRO-3: this rank's own partitions (the optimizer's come with rng-rankR.pt)
        mine, error = partitions_file(ckpt, strategy.acc.process_index), None
        try:
            saved = _load(mine, "ZeRO-3 partitions", (role.name,))[role.name]
            strategy.load_partitions(role, saved, str(mine))
        except CheckpointError as e:
            error = e
        _agree(mine, error, strategy.world)   # a damaged file on one rank stops every rank with its line
        role.scheduler.load_state_dict(state["scheduler"])
        role.updates = int(state["updates"])
        return
    if is_sharded(ckpt):
        kept = read_shard_index(ckpt).state_dict_metadata
        tensors = strategy.checkpoint_template(role, ema=any(k.startswith(f"{role.name}.ema.") for k in kept))
        load_shards(ckpt, {role.name: tensors}, strategy.world)
        try:
            strategy.load_checkpoint_shards(role, tensors, state["optimizer"]["param_groups"])
            role.scheduler.load_state_dict(state["scheduler"])
            role.updates = int(state["updates"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{path}: does not fit this run's optimizer ({type(e).__name__}: {e}); "
                                  f"{RESUME_ADVICE}") from None
        return
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
    logged). A step missing from metrics.jsonl is judged by the weights alone; a sharded
    checkpoint (no DiT directories to read in one process) by its loss alone.
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
