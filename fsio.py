"""Atomic writes (interim: replaced by the full implementation of the reliability work)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from .errors import ForcelabError

MARKER = ".forcelab"


def written_by_forcelab(path) -> bool:
    return (Path(path) / MARKER).is_file()


@contextlib.contextmanager
def atomic_directory(path, *, overwrite: bool = False):
    path = Path(path).expanduser()
    if path.exists() and not (overwrite and written_by_forcelab(path)):
        raise ForcelabError(f"{path}: exists; forcelab will not replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.forcelab-tmp-", dir=path.parent))
    try:
        yield tmp
        (tmp / MARKER).write_text("")
        if path.exists():
            old = path.parent / f"{tmp.name}.old"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
