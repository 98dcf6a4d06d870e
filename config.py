"""Configs: YAML files composed with omegaconf, dotted overrides, strict dataclass schemas.

    cfg = load_config(TrainConfig, ["configs/recipes/base.yaml", "my.yaml"], ["optim.lr=1e-5"])

A YAML file may start with `_base_: other.yaml` (or a list), resolved relative to the file,
merged before the file itself. Every key is checked against the dataclass schema: an unknown
key is a `ConfigError` naming the key, the file (or "command line") and the closest valid keys.
Values are never evaluated as code.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Iterable, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .errors import ConfigError

T = TypeVar("T")
# dtype names accepted everywhere (CLI flags, configs, loaders)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
BASE_KEY = "_base_"


def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            keys.extend(_valid_keys(node._get_node(k), full + "."))
    return keys


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    """The file and its bases, bases first, as (source name, config) pairs."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config {path}: {BASE_KEY} forms a cycle ({' -> '.join(map(str, seen))})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml errors come in many classes
        raise ConfigError(f"config {path}: not valid YAML ({e})") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config {path}: the top level must be a mapping of keys")
    out: list[tuple[str, DictConfig]] = []
    bases = node.pop(BASE_KEY, None)
    if bases is not None:
        for base in [bases] if isinstance(bases, str) else list(bases):
            out += _read_yaml(path.parent / str(base), seen + (path,))
    out.append((str(path), node))
    return out


def _merge(schema: DictConfig, node: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, node)
    except ConfigKeyError as e:
        key = e.full_key or e.key
        close = difflib.get_close_matches(str(key), _valid_keys(schema), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"{source}: unknown config key '{key}'{hint}") from None
    except (ValidationError, OmegaConfBaseException) as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{source}: bad value for '{key}': {msg}") from None


def _open_mappings(node: DictConfig) -> None:
    """Fields typed dict[str, X] take any key (their values are still checked against X);
    dataclass fields stay strict."""
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            if child._metadata.object_type is dict:
                OmegaConf.set_struct(child, False)
            else:
                _open_mappings(child)


def load_config(schema: type[T], files: Iterable[str | Path] = (),
                overrides: Iterable[str] = ()) -> T:
    """Compose `files` (in order, later wins) and `overrides` ("a.b=value") onto `schema`."""
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"schema must be a dataclass, got {schema!r}")
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    _open_mappings(cfg)
    for f in files:
        for source, node in _read_yaml(Path(f)):
            cfg = _merge(cfg, node, source)
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override '{item}' must look like key.sub=value")
    if overrides:
        cfg = _merge(cfg, OmegaConf.from_dotlist(overrides), "command line")
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(f"config: required keys not set: {', '.join(sorted(missing))}")
    return OmegaConf.to_object(cfg)


def to_yaml(obj: Any) -> str:
    """A config dataclass as YAML (saved beside checkpoints so a run can be inspected)."""
    return OmegaConf.to_yaml(OmegaConf.structured(obj))


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """"bf16" / "fp16" / "fp32" (or the torch names, or a torch.dtype) -> torch.dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]
