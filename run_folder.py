"""Where weights live in a forcelab run, and which encoders they belong to.

    run_dir/forcelab-run.json           the run: recipe, encoders ({"vae", "text_encoder"})
    run_dir/checkpoint-000600/          a training checkpoint (trainer_state.json inside)
        generator/, generator_ema/      DiT directories (config.json + safetensors)
        sharded/                        or: each rank's shards (torch.distributed.checkpoint), which
                                        `forcelab export` turns into DiT directories (train/checkpoint.py)
    EXPORT_DIR/forcelab.json            an exported DiT directory's encoders

`resolve_weights(path, role)` turns any of these (or a plain DiT / Wan pipeline directory)
into the DiT directory to load; `recorded_encoders(dit_dir)` finds its encoders, so
`forcelab generate RUN_DIR` needs no --vae / --text-encoder.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ForcelabError
from .fsio import write_text_atomic

RUN_RECORD = "forcelab-run.json"       # marks a run folder
TRAINER_STATE = "trainer_state.json"   # marks a training checkpoint folder (written last)
ENCODERS_RECORD = "forcelab.json"      # beside an exported DiT's config.json
CHECKPOINT_PREFIX = "checkpoint-"
EMA_SUFFIX = "_ema"
SHARDED_DIR = "sharded"                # a sharded checkpoint's torch.distributed.checkpoint folder
ARCHITECTURE_DIR = "architecture"      # a sharded checkpoint's roles' config.json (ROLE/config.json)


def is_sharded(checkpoint: Path) -> bool:
    """A training checkpoint written in the sharded format."""
    return (Path(checkpoint) / SHARDED_DIR).is_dir() and (Path(checkpoint) / TRAINER_STATE).is_file()


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*")
             if p.is_dir() and (p / TRAINER_STATE).is_file() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def is_run(path: Path) -> bool:
    return (Path(path) / RUN_RECORD).is_file() or (Path(path) / TRAINER_STATE).is_file()


def resolve_weights(path, role: str = "generator", ema: bool = True) -> Path:
    """The DiT directory of `role` in a run folder (its newest checkpoint), a checkpoint folder
    (the EMA weights when kept and ema=True), a Wan pipeline folder, or a DiT directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ForcelabError(f"weights {path}: not found")
    if (p / RUN_RECORD).is_file() and not (p / TRAINER_STATE).is_file():
        found = checkpoints(p)
        if not found:
            raise ForcelabError(f"weights {path}: a forcelab run without a finished checkpoint yet")
        p = found[-1]
    if is_sharded(p):
        raise ForcelabError(f"weights {path}: checkpoint {p.name} is sharded (one file per training process); "
                            f"turn it into DiT directories first: forcelab export {p} OUT_DIR")
    if (p / TRAINER_STATE).is_file():
        for name in ([role + EMA_SUFFIX] if ema else []) + [role]:
            if (p / name / "config.json").is_file():
                return p / name
        have = sorted(d.name for d in p.iterdir() if (d / "config.json").is_file())
        raise ForcelabError(f"weights {path}: checkpoint {p.name} has no role '{role}' (it has {have})")
    if (p / "transformer" / "config.json").is_file():
        return p / "transformer"
    if not (p / "config.json").is_file():
        raise ForcelabError(f"weights {path}: not a DiT directory (config.json + safetensors), a forcelab run "
                            f"or a training checkpoint folder")
    return p


def recorded_encoders(dit_dir: Path) -> dict | None:
    """{"vae", "text_encoder"} recorded for a DiT directory: its own record (export), or its
    run's (a checkpoint's role folder)."""
    dit_dir = Path(dit_dir)
    for p in (dit_dir / ENCODERS_RECORD, dit_dir.parent.parent / RUN_RECORD):
        if p.is_file():
            try:
                rec = json.loads(p.read_text())
            except ValueError as e:
                raise ForcelabError(f"{p}: not valid JSON ({e})") from None
            if isinstance(rec, dict) and isinstance(rec.get("vae"), str) and isinstance(rec.get("text_encoder"), str):
                return {"vae": rec["vae"], "text_encoder": rec["text_encoder"]}
    return None


def write_encoders_record(dit_dir: Path, vae: str, text_encoder: str, **extra) -> None:
    write_text_atomic(Path(dit_dir) / ENCODERS_RECORD,
                      json.dumps({"vae": vae, "text_encoder": text_encoder, **extra}, indent=2) + "\n")
