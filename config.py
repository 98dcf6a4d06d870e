"""Configs: YAML files composed with omegaconf, dotted overrides, strict dataclass schemas.

    cfg = load_config(TrainConfig, ["configs/recipes/base.yaml", "my.yaml"], ["optim.lr=1e-5"])

A YAML file may start with `_base_: other.yaml` (or a list), resolved relative to the file,
merged before the file itself. Every key is checked against the dataclass schema: an unknown
key is a `ConfigError` naming the key, the file (or "command line") and the closest valid keys.
Values are never evaluated as code. YAML is read with YAML 1.2 booleans (only true/false):
`name: NO` is the string "NO", not False. Config files are UTF-8 and end in .yaml or .yml.

Paths in values (weights, data, output_dir) are read relative to the working directory, as
on the command line; only `_base_` is relative to the file that names it. A value
`${forcelab:configs/toy/teacher_checkpoint}` is a file shipped inside the forcelab package,
wherever it is installed (the toy configs' committed teacher).

Overrides, applied in order after the files, as Hydra's:
    key.sub=value     set a key (also a new key of an open mapping such as model_overrides;
                      ++key.sub=value, Hydra's spelling, is the same)
    +key.sub=value    add a key the composed config does not have yet (an error if it has it)
    ~key.sub          remove a key of an open mapping, or reset a setting to its default
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Iterable, TypeVar

import re

import yaml
from omegaconf import DictConfig, OmegaConf
try:  # omegaconf's own loader (float syntax, duplicate keys, alias limits); it moved in 2.4
    from omegaconf._yaml import get_yaml_loader
except ImportError:  # omegaconf 2.3
    from omegaconf._utils import get_yaml_loader
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, OmegaConfBaseException, ValidationError

from .errors import ConfigError, ForcelabError
from .fsio import read_text

T = TypeVar("T")
BASE_KEY = "_base_"
PACKAGE_DIR = Path(__file__).resolve().parent   # where ${forcelab:PATH} values point
YAML_SUFFIXES = (".yaml", ".yml")
_SHOWN_KEY = 40  # characters of an unknown key echoed back (a wrong file must not be dumped)
_BOOL_TAG = "tag:yaml.org,2002:bool"


def _yaml12_loader():
    """omegaconf's YAML loader (1e-5 is a float, duplicate keys are errors) with YAML 1.2
    booleans: yes/no/on/off (any case) stay strings."""
    base = get_yaml_loader()
    loader = type("Yaml12Loader", (base,), {})
    resolvers = {}
    for first, entries in base.yaml_implicit_resolvers.items():
        kept = [(tag, rx) for tag, rx in entries if tag != _BOOL_TAG]
        if first in "tTfF":
            kept.insert(0, (_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")))
        resolvers[first] = kept
    loader.yaml_implicit_resolvers = resolvers
    return loader


_LOADER = _yaml12_loader()


def _parse_yaml(text: str, source: str):
    try:
        return yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f":{where.line + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{source}{line}: not valid YAML ({problem})") from None
    except Exception as e:  # omegaconf's duplicate-key check raises a plain error
        raise ConfigError(f"{source}: not valid YAML ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _shown(key: Any) -> str:
    text = str(key)
    return text if len(text) <= _SHOWN_KEY else text[:_SHOWN_KEY] + "..."


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
    path = path.expanduser().resolve()
    if path in seen:
        raise ConfigError(f"config {path}: {BASE_KEY} forms a cycle ({' -> '.join(map(str, seen))})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix.lower() not in YAML_SUFFIXES:
        raise ConfigError(f"config {path}: not a YAML config file (the name must end in "
                          f"{' or '.join(YAML_SUFFIXES)})")
    try:
        raw = _parse_yaml(read_text(path, "config"), str(path))
    except ConfigError:
        raise
    except ForcelabError as e:
        raise ConfigError(str(e)) from None
    if raw is None:     # an empty file (or comments only) sets nothing: the schema's defaults
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping of keys (key: value lines)")
    if any(not isinstance(k, str) or not k.strip() or "\n" in k for k in raw):
        raise ConfigError(f"config {path}: not a forcelab config (its keys are not names)")
    bases = raw.pop(BASE_KEY, None)
    try:
        node = OmegaConf.create(raw)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config {path}: {_first_line(e)}") from None
    out: list[tuple[str, DictConfig]] = []
    if bases is not None:
        listed = [bases] if isinstance(bases, str) else bases
        if not isinstance(listed, list) or not listed or not all(isinstance(b, str) and b for b in listed):
            raise ConfigError(f"config {path}: {BASE_KEY} must be a file name or a list of file names "
                              f"(e.g. {BASE_KEY}: base.yaml), got {_shown(bases)!r}")
        for base in listed:
            out += _read_yaml(path.parent / base, seen + (path,))
    out.append((str(path), node))
    return out


def _check_sections(schema: DictConfig, node: Any, source: str, prefix: str = "") -> None:
    """A plain value where the schema has a section (or the reverse) gets a clear message."""
    if not isinstance(node, DictConfig):
        return
    for key in node.keys():
        if key not in schema:
            continue  # unknown keys are reported by _merge with suggestions
        want, got = schema._get_node(key), node._get_node(key)
        full = f"{prefix}{key}"
        if isinstance(want, DictConfig) and not isinstance(got, DictConfig) and not OmegaConf.is_missing(node, key):
            subkeys = list(want.keys())
            example = f" (e.g. {full}.{subkeys[0]}: ...)" if subkeys else ""
            raise ConfigError(f"{source}: '{full}' is a section of keys ({', '.join(map(str, subkeys[:6]))}); "
                              f"give its keys, not a single value{example}")
        if isinstance(want, DictConfig) and isinstance(got, DictConfig):
            _check_sections(want, got, source, full + ".")


def _unknown_key(key: Any, schema: DictConfig, source: str) -> ConfigError:
    close = difflib.get_close_matches(str(key), _valid_keys(schema), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see the schema's fields"
    return ConfigError(f"{source}: unknown config key '{_shown(key)}'{hint}")


def _merge(schema: DictConfig, node: DictConfig, source: str) -> DictConfig:
    _check_sections(schema, node, source)
    try:
        return OmegaConf.merge(schema, node)
    except ConfigKeyError as e:
        raise _unknown_key(e.full_key or e.key, schema, source) from None
    except (ValidationError, OmegaConfBaseException) as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        where = f"bad value for '{key}'" if key else "bad value"
        raise ConfigError(f"{source}: {where}: {_first_line(e)}") from None
    except TypeError as e:     # a mapping merged onto a list (`betas.x=1`)
        if "incompatible container" not in str(e):
            raise
        raise ConfigError(f"{source}: keys given below a list (a list takes values: key: [a, b])") from None


_OVERRIDE_FORMS = "key.sub=value, +key.sub=value (add) or ~key.sub (remove)"
_ABSENT = object()


def _override_key(item: str) -> tuple[str, list[str], str | None]:
    """"+a.b=v" / "a.b=v" / "~a.b" -> (op "+", "=" or "~", ["a", "b"], the value text or None).
    "++a.b=v" (Hydra's add-or-set) is "a.b=v": a plain override sets or adds already."""
    item = item[2:] if item.startswith("++") else item
    op = item[0] if item[:1] in ("+", "~") else "="
    key, sep, text = item[1 if op != "=" else 0:].partition("=")
    parts = key.strip().split(".")
    if op == "~" and sep:
        raise ConfigError(f"command line: override '{_shown(item)}': write ~{_shown(key.strip())} "
                          f"(a removal takes no value)")
    if (op != "~" and not sep) or not all(p.strip() for p in parts) or parts[0][:1] in ("+", "~"):
        raise ConfigError(f"command line: override '{_shown(item)}' must look like {_OVERRIDE_FORMS}")
    return op, [p.strip() for p in parts], text if sep else None


def _overrides(items: list[str]) -> DictConfig:
    """"a.b=value" strings -> a config, values read as YAML 1.2 like the files."""
    tree: dict = {}
    for item in items:
        _, parts, text = _override_key(item)
        value = _parse_yaml(text, f"command line: override '{_shown(item)}'") if text.strip() else ""
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: override '{_shown(item)}' sets a key below a value")
        node[parts[-1]] = value
    try:
        return OmegaConf.create(tree)
    except OmegaConfBaseException as e:
        raise ConfigError(f"command line: {_first_line(e)}") from None


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


def holds_settings(path: str | Path) -> bool:
    """Whether a config file (with its bases) sets anything: an empty one means the defaults."""
    return any(len(node) for _, node in _read_yaml(Path(path)))


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
    cfg = apply_overrides(cfg, list(overrides))
    try:
        missing = OmegaConf.missing_keys(cfg)
        if missing:
            raise ConfigError(f"config: required keys not set: {', '.join(sorted(missing))}")
        return OmegaConf.to_object(cfg)
    except InterpolationResolutionError as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"config: '{key}' refers to something that does not exist ({_first_line(e)}); "
                          f"fix the ${{...}} reference") from None
    except (ValidationError, OmegaConfBaseException) as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"config: bad value{f' for {key!r}' if key else ''}: {_first_line(e)}") from None


def apply_overrides(cfg: DictConfig, items: list[str]) -> DictConfig:
    """Apply command-line overrides in their order: runs of key=value merge as one config
    (so `a=1 a.b=2` is caught), +key checks the key is absent first, ~key removes or resets."""
    batch: list[str] = []
    for item in items:
        op, parts, _ = _override_key(item)
        if op == "=":
            batch.append(item)
            continue
        if batch:
            cfg, batch = _merge(cfg, _overrides(batch), "command line"), []
        key = ".".join(parts)
        if op == "+":
            present = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=False)
            if present is not _ABSENT:
                raise ConfigError(f"command line: +{_shown(key)}: '{_shown(key)}' is already in the config; "
                                  f"write {_shown(key)}=VALUE to change it")
            batch.append(item.lstrip("+"))
        else:
            cfg = _remove(cfg, parts)
    if batch:
        cfg = _merge(cfg, _overrides(batch), "command line")
    return cfg


def _remove(cfg: DictConfig, parts: list[str]) -> DictConfig:
    """~key: delete a key of an open mapping (model_overrides.x, roles.critic), or put a
    schema field (a setting or a whole section) back to its default."""
    key, node = ".".join(parts), cfg
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth + 1])
        if not isinstance(node, DictConfig):
            raise ConfigError(f"command line: ~{_shown(key)}: '{_shown('.'.join(parts[:depth]))}' is a value, "
                              f"not a section of keys")
        schema = node._metadata.object_type
        is_open = schema is dict or not dataclasses.is_dataclass(schema)
        if part not in node:
            if not is_open:
                raise _unknown_key(key, cfg, "command line")
            raise ConfigError(f"command line: ~{_shown(key)}: nothing to remove ('{_shown(where)}' is not "
                              f"in the config)")
        if depth < len(parts) - 1:
            node = node._get_node(part)
        elif is_open:                               # an open mapping: the key goes
            del node[part]
        else:                                       # a schema field: its default
            node[part] = OmegaConf.structured(schema)._get_node(part)
            _open_mappings(cfg)     # a section put back is as open (or strict) as the schema's
    return cfg


def _package_path(relative: str) -> str:
    """${forcelab:PATH}: PATH inside the installed forcelab package (shipped data, e.g. the toy
    teacher), as an absolute path."""
    rel = Path(str(relative))
    if rel.is_absolute() or ".." in rel.parts:
        raise ConfigError(f"${{forcelab:{relative}}}: give a path inside the forcelab package "
                          f"(e.g. configs/toy/teacher_checkpoint)")
    return str(PACKAGE_DIR / rel)


# omegaconf 2.4 renamed register_new_resolver; 2.3 has only the old name
getattr(OmegaConf, "register_resolver", OmegaConf.register_new_resolver)("forcelab", _package_path, replace=True)


def to_yaml(obj: Any) -> str:
    """A config dataclass as YAML (saved beside checkpoints so a run can be inspected)."""
    return OmegaConf.to_yaml(OmegaConf.structured(obj))

