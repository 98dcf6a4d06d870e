"""Progress of long jobs (training steps, generated frames, encoded inputs, scored videos).

On a terminal: a tqdm bar. Anywhere else (a log file, a pipe, a cluster job's output) a bar's
carriage returns are noise and a disabled bar says nothing, so a plain line is printed every
LINE_EVERY_PERCENT percent and at the end:

    generate: 40/120 frame (33%) 12.5 s, 3.2 frame/s

Both take the same calls: iterate, update(n), set_postfix(dict), write(text), close(), `with`.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, TextIO

LINE_EVERY_PERCENT = 10


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str,
             initial: int = 0, disable: bool = False, file: TextIO | None = None):
    """A tqdm bar on a terminal, else a LineProgress; `disable` silences both."""
    stream = file if file is not None else sys.stderr
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not disable and _is_terminal(stream):
        from tqdm import tqdm

        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=stream)
    return LineProgress(iterable, total=total, initial=initial, desc=desc, unit=unit, disable=disable, file=stream)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):   # no isatty, or a closed stream
        return False


class LineProgress:
    """Plain progress lines: one each time the count crosses another LINE_EVERY_PERCENT percent
    of `total` (every update when the total is unknown is too many: then only at the end)."""

    def __init__(self, iterable=None, *, total, initial=0, desc, unit, disable=False, file=sys.stderr):
        self.iterable, self.total, self.n = iterable, total, initial
        self.desc, self.unit, self.disable, self.file = desc, unit, disable, file
        self.postfix = ""
        self._t0, self._n0 = time.perf_counter(), initial
        self._shown = self._step(initial)
        self._closed = False

    def _step(self, n: int) -> int:
        return n * 100 // (self.total * LINE_EVERY_PERCENT) if self.total else 0

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        step = self._step(self.n)
        if step > self._shown and (self.total is None or self.n < self.total):
            self._shown = step
            self._line()

    def set_postfix(self, values: dict | None = None, refresh: bool = True, **kwargs) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in {**(values or {}), **kwargs}.items())

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def write(self, text: str, file: TextIO | None = None) -> None:
        print(text, file=file or self.file, flush=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n > self._n0:
                self._line()

    def _line(self) -> None:
        if self.disable:
            return
        seconds = time.perf_counter() - self._t0
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        percent = f" ({100 * self.n // self.total}%)" if self.total else ""
        rate = f", {(self.n - self._n0) / seconds:.3g} {self.unit}/s" if seconds > 0 else ""
        extra = f" {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} {self.unit}{percent} {seconds:.1f} s{rate}{extra}", file=self.file, flush=True)
