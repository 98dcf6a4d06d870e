"""Where generation's weights come from: the DiT directory (a checkpoint directory, a Wan
diffusers pipeline folder, a forcelab run or one of its checkpoints) and its encoders (given,
recorded with the weights, or a pipeline's sub-folders)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ForcelabError
from ..run_folder import is_run, resolve_weights

TOY_ENCODER = "toy"


def resolve_model(path) -> tuple[Path, list[Path]]:
    """-> (DiT directory, folders to look in for encoders). A forcelab run folder or one of
    its checkpoints gives the generator (its EMA when kept)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ForcelabError(f"model {path}: not found")
    if is_run(p):
        return resolve_weights(p, "generator"), []
    if p.is_file():
        raise ForcelabError(f"model {path}: a file; give a checkpoint directory (config.json + safetensors, "
                            f"written by save_pretrained). Loading training checkpoints is not supported yet: "
                            f"export the generator with save_pretrained first")
    if (p / "transformer" / "config.json").is_file():
        return p / "transformer", [p]
    if not (p / "config.json").is_file():
        raise ForcelabError(f"model {path}: no config.json - not a DiT checkpoint directory (save_pretrained, "
                            f"Wan or diffusers format). Training checkpoints are not supported yet: export the "
                            f"generator with save_pretrained first")
    return p, [p, p.parent]


def resolve_encoder(flag_value: str | None, folders: list[Path], sub: str, flag: str, hint: str,
                    recorded: str | None = None) -> str:
    """The flag's value, else the encoder recorded with the weights, else a pipeline's sub-folder."""
    if flag_value is not None:
        flag_value = str(flag_value)
        if flag_value != TOY_ENCODER and not flag_value.startswith(f"{TOY_ENCODER}:") and not Path(flag_value).exists():
            raise ForcelabError(f"{flag} {flag_value}: not found")
        return flag_value
    if recorded is not None:
        return recorded
    for folder in folders:
        if (folder / sub / "config.json").is_file():
            return str(folder)
    raise ForcelabError(f"the model has no {sub}/ folder beside it: pass {flag} DIR (or {flag} {TOY_ENCODER}{hint})")
