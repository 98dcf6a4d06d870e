"""The files a training config names, checked all together before anything is built.

    check_paths(cfg)      # a ConfigError listing every missing or unreadable path, by key

A config names weights (roles.<name>.init), encoders (vae, text_encoder) and data
(data.source: latent shards or a prompt file). A cluster job should not learn of the third
missing folder after loading two models, nor a user fix them one run at a time: every path is
checked first, each reported under the key it was written as, and a file forcelab knows (the
Wan2.1 folders, Self-Forcing's prompt list) says where to get it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError
from .data import PROMPT_SUFFIXES, TOYWORLD
from .recipe import recipe_class
from .roles import init_setting, resolve_init

# Files the Wan-scale recipes (configs/recipes/) expect, by name: where each one comes from.
# {path} is the path the config gives, {parent} its folder.
DOWNLOADS = {
    "Wan2.1-T2V-1.3B-Diffusers": "get it with: hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir {path}",
    "Wan2.1-T2V-14B-Diffusers": "get it with: hf download Wan-AI/Wan2.1-T2V-14B-Diffusers --local-dir {path}",
    "vidprom_filtered_extended.txt": ("Self-Forcing's training prompts (VidProM prompts extended by an LLM, "
                                      "UTF-8 text, one prompt per line); get it with: hf download "
                                      "gdhe17/Self-Forcing vidprom_filtered_extended.txt --local-dir {parent}"),
}
WHAT = {
    "vae": "a local diffusers Wan VAE folder (or a Wan2.1 diffusers folder with vae/ inside), or toy",
    "text_encoder": "a local umT5 folder with its tokenizer (or a Wan2.1 diffusers folder), or toy",
    "init": "a Wan / diffusers DiT folder, a forcelab run or one of its checkpoints (run the earlier stage "
            "first)",
    "prompts": "a prompt file: .txt with one prompt per line, or .csv / .jsonl with a prompt or caption column",
    "data": f"latent shards (forcelab preprocess --out), a prompt file (.txt/.csv/.jsonl) or {TOYWORLD}",
}


def _is_toy(spec: str) -> bool:
    return spec == "toy" or spec.startswith("toy:")


def _problem(path: Path) -> str | None:
    """"not found" / "not readable", or None for a path that can be read."""
    if not path.exists():
        return "not found"
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        return "not readable (check its permissions)"
    return None


def _hint(value: str, what: str) -> str:
    known = DOWNLOADS.get(Path(value).name)
    if known is None:
        return f"give {what}"
    return known.format(path=value, parent=Path(value).parent.as_posix() or ".")


def path_problems(cfg) -> list[str]:
    """One line per missing or unreadable path of `cfg`, "key: path: problem; what to do"
    (encoders, data, then each role's weights under the key that names them); then the weights
    that exist but cannot be loaded (a folder of something else, a run without a checkpoint)."""
    named = [(key, str(getattr(cfg, key)), WHAT[key]) for key in ("vae", "text_encoder")
             if not _is_toy(str(getattr(cfg, key)))]
    if cfg.data.source != TOYWORLD:
        prompts = Path(cfg.data.source).suffix in PROMPT_SUFFIXES
        named.append(("data.source", cfg.data.source, WHAT["prompts" if prompts else "data"]))
    specs, inits = recipe_class(cfg.recipe).roles, {}
    for name in specs:
        found = init_setting(cfg, specs, name)
        if found is not None:
            inits.setdefault(found[0], found[1].init)      # each role's init once
    named += [(f"roles.{source}.init", init, WHAT["init"]) for source, init in inits.items()]
    lines, missing = [], set()
    for key, value, what in named:
        problem = _problem(Path(value).expanduser())
        if problem:
            lines.append(f"{key}: {value}: {problem}; {_hint(value, what)}")
            missing.add(key)
    for source in inits:
        if f"roles.{source}.init" not in missing:
            try:
                resolve_init(cfg, specs, source)
            except ConfigError as e:
                lines.append(str(e))
    return lines


def check_paths(cfg) -> None:
    """A ConfigError naming every missing or unreadable path of the config at once: one line
    for one path, else a summary line and one line per path."""
    lines = path_problems(cfg)
    if len(lines) == 1:
        raise ConfigError(lines[0])
    if lines:
        raise ConfigError(f"{len(lines)} paths of the config cannot be read; set each key in the config "
                          f"or on the command line (key=PATH):\n" + "\n".join(f"  {line}" for line in lines))
