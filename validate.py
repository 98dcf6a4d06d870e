"""Checks for user-facing numbers and names, used once at each boundary (CLI, config, API).

    frames = positive_int(frames, "--frames")           # ForcelabError naming --frames
    parser.add_argument("--frames", type=arg(positive_int))   # argparse: exit 2, one line
    choice(device_kind, "--device", ("cpu", "cuda"))
    lr: float = setting(1e-4, non_negative_float)              # a config field and its rule

Every check returns the value (converted: "3" -> 3) or raises ForcelabError with one line
that names the thing, says what was wrong and what is allowed. `arg(check, ...)` turns a
check into an argparse `type=` so a bad flag fails before any work; `setting(default, check)`
declares a config field with its rule, which `check_settings` applies when the config loads.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
from typing import Any, Callable, Iterable

from .errors import ForcelabError
from .seeds import MASK as SEED_MASK    # seeds are 63-bit


def _say(name: str | None, text: str) -> str:
    return f"{name} {text}" if name else text


def _number(value: Any, name: str | None, kind: type) -> int | float:
    if isinstance(value, bool):  # True is an int to Python, never to a user
        raise ForcelabError(_say(name, f"must be a number, got {value!r}"))
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise ForcelabError(_say(name, f"must be a whole number, got {value!r}")) from None
        if not isinstance(value, int):
            raise ForcelabError(_say(name, f"must be a whole number, got {value!r}"))
        return value
    try:
        out = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ForcelabError(_say(name, f"must be a number, got {value!r}")) from None
    return out


def finite_float(value: Any, name: str | None = None) -> float:
    v = _number(value, name, float)
    if not math.isfinite(v):
        raise ForcelabError(_say(name, f"must be a finite number, got {value!r}"))
    return v


def positive_float(value: Any, name: str | None = None) -> float:
    v = finite_float(value, name)
    if v <= 0:
        raise ForcelabError(_say(name, f"must be > 0, got {value!r}"))
    return v


def non_negative_float(value: Any, name: str | None = None) -> float:
    v = finite_float(value, name)
    if v < 0:
        raise ForcelabError(_say(name, f"must be >= 0, got {value!r}"))
    return v


def positive_int(value: Any, name: str | None = None) -> int:
    v = _number(value, name, int)
    if v < 1:
        raise ForcelabError(_say(name, f"must be a whole number >= 1, got {value!r}"))
    return v


def non_negative_int(value: Any, name: str | None = None) -> int:
    v = _number(value, name, int)
    if v < 0:
        raise ForcelabError(_say(name, f"must be a whole number >= 0, got {value!r}"))
    return v




def seed(value: Any, name: str | None = None) -> int:
    """A random seed: a whole number in [0, 2^63 - 1] (larger ones would silently alias smaller ones)."""
    v = _number(value, name, int)
    if not 0 <= v <= SEED_MASK:     # torch.Generator takes 64 bits and wraps larger numbers onto smaller ones
        raise ForcelabError(_say(name, f"must be a whole number from 0 to 2^63 - 1 (seeds are 63-bit), got {value!r}"))
    return v


def threads(value: Any, name: str | None = None) -> int:
    """CPU threads for torch: 1 to the machine's logical CPUs (more only contend for them)."""
    cpus = os.cpu_count() or 1
    return int(in_range(value, name, 1, cpus, integer=True, why=f"{cpus} logical CPUs here"))


def optional(check: Callable[..., Any]) -> Callable[..., Any]:
    """A check that also lets None through (an unset option)."""
    def run(value: Any, name: str | None = None, *args: Any, **kwargs: Any):
        return None if value is None else check(value, name, *args, **kwargs)
    run.__name__ = f"optional_{getattr(check, '__name__', 'check')}"
    return run


def in_range(value: Any, name: str | None, lo: float | None = None, hi: float | None = None,
             *, integer: bool = False, why: str = "") -> int | float:
    """lo <= value <= hi (either bound may be None); `why` explains where a limit comes from."""
    v = _number(value, name, int) if integer else finite_float(value, name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = (f"between {lo:g} and {hi:g}" if lo is not None and hi is not None
                  else f">= {lo:g}" if lo is not None else f"<= {hi:g}")
        raise ForcelabError(_say(name, f"must be {bounds}{f' ({why})' if why else ''}, got {value!r}"))
    return v


def multiple_of(value: Any, name: str | None, unit: int, what: str = "") -> int:
    """A whole number of units (frames of whole chunks); `what` says where the unit comes from."""
    v = _number(value, name, int)
    if v % unit:
        raise ForcelabError(_say(name, f"({value!r}) must be a multiple of {what or 'the unit'} ({unit})"))
    return v


def unit_interval(value: Any, name: str | None = None) -> float:
    """A probability or a ratio: 0 <= value <= 1."""
    return in_range(value, name, 0.0, 1.0)


def decay(value: Any, name: str | None = None) -> float:
    """An EMA decay or an Adam beta: 0 <= value < 1 (at 1 the average would never move)."""
    v = finite_float(value, name)
    if not 0.0 <= v < 1.0:
        raise ForcelabError(_say(name, f"must be >= 0 and < 1, got {value!r}"))
    return v


def each(check: Callable[..., Any], *args: Any, min_items: int = 0, **kwargs: Any) -> Callable[..., list]:
    """A check of every item of a list, each named key[i]: each(in_range, 0, 1000, min_items=1)."""
    def run(values: Any, name: str | None = None) -> list:
        if not isinstance(values, (list, tuple)):
            raise ForcelabError(_say(name, f"must be a list, got {values!r}"))
        if len(values) < min_items:
            raise ForcelabError(_say(name, f"must list at least {min_items} value(s), got {list(values)!r}"))
        return [check(v, f"{name}[{i}]" if name else None, *args, **kwargs) for i, v in enumerate(values)]
    run.__name__ = f"each_{getattr(check, '__name__', 'check')}"
    return run


def text(value: Any, name: str | None = None) -> str:
    """A prompt, a name or a path as the user wrote it: any text without a NUL byte (the OS
    refuses one in a path, and in a prompt it means nothing)."""
    if not isinstance(value, str):
        raise ForcelabError(_say(name, f"must be text, got {value!r}"))
    if "\0" in value:
        raise ForcelabError(_say(name, "holds a NUL byte (\\0); remove it"))
    return value


def choice(value: Any, name: str | None, options: Iterable[Any]) -> Any:
    options = list(options)
    if value not in options:
        raise ForcelabError(_say(name, f"must be one of {', '.join(map(str, options))}; got {value!r}"))
    return value


def arg(check: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[str], Any]:
    """An argparse `type=` from a check: argparse adds the flag name to the message.

    arg(positive_int); arg(in_range, 0, 1000, integer=True)."""
    def parse(text: str):
        try:
            return check(text, None, *args, **kwargs)
        except ForcelabError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = getattr(check, "__name__", "value").replace("_", " ")
    return parse


# ---------------------------------------------------------------------- config fields
RULE = "forcelab.rule"      # dataclass field metadata: (check, args, kwargs)


def setting(default: Any, check: Callable[..., Any] | None = None, *args: Any, **kwargs: Any):
    """A config dataclass field declared with the rule its value must follow:

        lr: float = setting(1e-4, non_negative_float)             # base learning rate
        dtype: str | None = setting(None, optional(choice), ("fp32", "bf16"))

    check_settings runs check(value, "dotted.key", *args, **kwargs) when a config is loaded; a
    subclass that redefines the field with a plain default keeps the rule. A list or dict
    default is copied for each instance."""
    meta = {RULE: (check, args, kwargs)} if check is not None else {}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_settings(obj: Any, prefix: str = "") -> None:
    """Every rule declared with `setting` on a config dataclass and on the dataclasses inside
    it (fields, dict values, list items), each error naming the dotted key. Whatever the
    rules, every number must be finite and no text may hold a NUL byte: neither can mean
    anything in a setting."""
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        _check_plain(value, key)
        check, args, kwargs = _rule(type(obj), f.name)
        if check is not None:
            check(value, key, *args, **kwargs)


def _rule(cls: type, name: str) -> tuple:
    """The field's rule, from the nearest class that declares one: a subclass that only
    changes a default keeps its base's rule."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and RULE in f.metadata:
            return f.metadata[RULE]
    return None, (), {}


def _check_plain(value: Any, key: str) -> None:
    if isinstance(value, float):
        finite_float(value, key)
    elif isinstance(value, str):
        text(value, key)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{key}[{i}]")
    elif isinstance(value, dict):
        for k, item in value.items():
            _check_plain(item, f"{key}.{k}")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        check_settings(value, f"{key}.")


def parse_device(text: str | None, name: str = "--device"):
    """"cpu", "cuda", "cuda:1", ... -> torch.device that exists here (None: cuda if available)."""
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ForcelabError(f"{name} {text!r}: not a device; write cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ForcelabError(f"{name} {text}: no CUDA device here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ForcelabError(f"{name} {text}: there are {torch.cuda.device_count()} CUDA device(s), "
                                f"numbered from 0")
    elif device.type != "cpu":
        raise ForcelabError(f"{name} {text}: forcelab runs on cpu or cuda devices")
    return device


def memory_bytes(device) -> int:
    """Memory a job on `device` may use: the GPU's total memory, else the machine's RAM."""
    import torch

    if getattr(device, "type", device) == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fits_memory(needed: int, device, what: str, advice: str) -> None:
    """Refuse, before allocating, a job whose estimated size exceeds the device's memory."""
    have = memory_bytes(device)
    if needed > have:
        gib = 2**30
        raise ForcelabError(f"{what} needs about {needed / gib:,.1f} GiB but {device} has "
                            f"{have / gib:,.1f} GiB; {advice}")
