"""Checks for user-facing numbers and names, used once at each boundary (CLI, config, API).

    frames = positive_int(frames, "--frames")           # ForcelabError naming --frames
    parser.add_argument("--frames", type=arg(positive_int))   # argparse: exit 2, one line
    choice(device_kind, "--device", ("cpu", "cuda"))

Every check returns the value (converted: "3" -> 3) or raises ForcelabError with one line
that names the thing, says what was wrong and what is allowed. `arg(check, ...)` turns a
check into an argparse `type=` so a bad flag fails before any work.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, Callable, Iterable

from .errors import ForcelabError


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


def optional(check: Callable[[Any, str | None], Any]) -> Callable[[Any, str | None], Any]:
    """A check that also lets None through (an unset option)."""
    def run(value: Any, name: str | None = None):
        return None if value is None else check(value, name)
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
