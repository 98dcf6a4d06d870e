"""One writer per folder: `lock_folder(path, what)` holds the kernel's lock (flock) on
path/.forcelab-lock, recording the holder's pid, host and start time. A second writer gets one
line naming the holder; the lock dies with its process, so a crash leaves nothing that blocks
(the stale file is locked anew). A forked child (a DataLoader worker) drops its copy."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
import weakref
from pathlib import Path

from .errors import ForcelabError
from .fsio import LOCK, os_error_message


class FolderLock:
    """A held lock_folder(); release() (or leaving the `with` block) frees it."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd = path, fd
        _HELD.add(self)

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:  # delete the file while still holding the lock, only if it is still ours
            st, now = os.fstat(fd), os.stat(self.path, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)   # frees the flock

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


_HELD: "weakref.WeakSet[FolderLock]" = weakref.WeakSet()


def _forget_locks_in_child() -> None:
    """A forked child (a DataLoader worker) shares the parent's lock: it closes its copy, so it
    neither keeps the folder locked after the parent releases it nor deletes the lock file."""
    for lock in list(_HELD):
        if lock.fd is not None:
            with contextlib.suppress(OSError):
                os.close(lock.fd)
            lock.fd = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"pid {int(info['pid'])} on host {info['host']} (since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is just starting"


def lock_folder(path: str | os.PathLike, what: str) -> FolderLock:
    """Hold the one-writer lock of folder `path` (which exists), or raise ForcelabError naming the
    holder's pid and host. The lock is the kernel's (flock) on path/.forcelab-lock: it dies with
    its process, so a crash leaves nothing that blocks (the stale file is locked anew)."""
    import fcntl

    path = Path(path).expanduser()
    lock = path / LOCK
    for _ in range(100):   # retried only when a releasing holder deleted the file under us
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ForcelabError(f"{what} {path}: {LOCK} is a symbolic link; forcelab does not follow it "
                                    f"- remove it") from None
            raise ForcelabError(os_error_message(e, what)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ForcelabError(f"{what} {path}: in use by another forcelab run, {holder}; wait for it to "
                                f"finish or stop it - two runs must not write one folder") from None
        except OSError as e:   # a file system without locks: go on unprotected, and say so
            print(f"warning: {what} {path}: cannot lock it ({e.strerror}); nothing stops a second run "
                  f"from writing the same folder", file=sys.stderr)
        try:
            st, now = os.fstat(fd), os.stat(lock, follow_symlinks=False)
            same = (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError as e:
            os.close(fd)
            raise ForcelabError(os_error_message(e, what, lock)) from None
        return FolderLock(lock, fd)
    raise ForcelabError(f"{what} {path}: could not take its lock ({LOCK} keeps changing); try again")
