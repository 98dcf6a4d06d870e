"""Writing outputs safely: the one atomic-write implementation of forcelab.

    with atomic_directory("ckpt/model") as tmp:        # a fresh folder beside ckpt/model
        save_file(state, tmp / "weights.safetensors")  # ... moved into place on success
    write_text_atomic("out/run.json", text)            # tmp file + fsync + os.replace
    out = check_output_dir("~/videos", "--output")     # usable? (before any work)
    append_text(run_dir / "metrics.jsonl", line)       # one appended record
    out = claim_directory(args.out, "--out")           # a folder of outputs: new, empty or forcelab's
    with locks.lock_folder(out, "--out"):              # one writer per folder (forcelab.locks)
        ...

Rules (forcelab never deletes or replaces what it did not write):
- Every directory forcelab writes carries a marker file (MARKER). An existing directory is
  replaced only when it carries the marker (or is empty), unless the caller forbids even that
  (overwrite=False, e.g. a CLI without --overwrite); anything else is a ForcelabError raised
  before any work.
- The swap that replaces a directory is recoverable at every point:
      write .NAME.forcelab-tmp-*  ->  rename to .NAME.forcelab-new   (complete, fsynced)
      rename NAME -> .NAME.forcelab-old  ->  rename .NAME.forcelab-new -> NAME  ->  delete old
  A kill between the renames leaves NAME missing but .NAME.forcelab-new (or -old) present:
  `recover(NAME)` (called by every reader and writer) renames it back into place, so a reader
  finds the old or the new directory. Leftovers (temporaries of killed writes, the old copy)
  are deleted at the next write into the same folder.
- Files and folders are created with the process umask (no 0700 / 0600).
- A file forcelab writes or appends to that is a symbolic link leading out of its folder is
  refused (a link that stays inside the folder writes the file it names): forcelab never
  writes through a link into somebody else's file. A directory it would replace or delete
  that is a link is refused too.
- One writer per folder (forcelab.locks): `lock_folder` holds an flock on FOLDER/.forcelab-lock (recording the
  holder's pid and host) for as long as a run writes the folder. The kernel drops the lock
  when its process dies, so a crashed holder never blocks the next run; the stale file it
  leaves is simply locked again.
- Old outputs (rotated checkpoints) are deleted with `remove_directory`, which refuses a
  folder without the marker and first renames the folder to a temporary name, so a kill
  mid-delete never leaves a half-deleted folder under its real name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Iterator

from .errors import ForcelabError

MARKER = ".forcelab"            # in every directory forcelab writes
LOCK = ".forcelab-lock"         # in a folder a run is writing (lock_folder)
TMP_TAG = ".forcelab-tmp-"      # .NAME.forcelab-tmp-HOST-PID-RAND: a write in progress
NEW_TAG = ".forcelab-new"       # .NAME.forcelab-new: complete, about to replace NAME
OLD_TAG = ".forcelab-old"       # .NAME.forcelab-old: the replaced NAME, about to be deleted


def _step(name: str) -> None:
    """Called between the steps of a directory swap; tests replace it to simulate a kill."""


# ---------------------------------------------------------------------- names
def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def _tmp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}{TMP_TAG}{_host()}-{os.getpid()}-{secrets.token_hex(4)}")


def _new(target: Path) -> Path:
    return target.with_name(f".{target.name}{NEW_TAG}")


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}{OLD_TAG}")


def _owner_dead(name: str) -> bool:
    """A temporary's writer (host hash, pid in its name) is no longer running on this host."""
    try:
        host, pid, _ = name.rsplit(TMP_TAG, 1)[1].split("-")
        pid = int(pid)
    except ValueError:
        return False
    if host != _host():
        return False  # another machine's write: not ours to judge
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale(parent: str | os.PathLike) -> list[Path]:
    """Delete temporaries left in `parent` by killed writes (their process is gone).

    Only names forcelab made (.NAME.forcelab-tmp-HOST-PID-RAND) are touched."""
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        if entry.name.startswith(".") and TMP_TAG in entry.name and _owner_dead(entry.name):
            _remove(entry)
            removed.append(entry)
    return removed


# ---------------------------------------------------------------------- markers
def written_by_forcelab(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory forcelab wrote (it holds the marker file)."""
    path = Path(path)
    return path.is_dir() and (path / MARKER).is_file()


def folder_kind(path: str | os.PathLike) -> str | None:
    """The kind of folder forcelab's marker records ("training", "preprocess", "demo", "study"),
    None when the folder has no marker or one written before kinds were recorded."""
    try:
        record = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    kind = record.get("kind") if isinstance(record, dict) else None
    return kind if isinstance(kind, str) else None


def check_kind(path: str | os.PathLike, kind: str, what: str) -> None:
    """A folder forcelab marked as another kind (a training run given to the demo as --out) is
    refused: each command writes only into its own kind of folder."""
    found = folder_kind(path)
    if found is not None and found != kind:
        raise ForcelabError(f"{what} {path}: a forcelab {found} folder; {kind} output goes only into a new, empty "
                            f"or earlier {kind} folder - choose another")


def mark(directory: str | os.PathLike, kind: str | None = None) -> None:
    """Put forcelab's marker, recording the folder's `kind`, into a directory forcelab created
    (an existing marker is kept).

    Created in one step (O_EXCL), not through a temporary beside it: another process judging
    the folder meanwhile (a second rank) must never see a forcelab temporary and no marker.
    A link or a folder in the marker's place is refused."""
    from . import __version__

    path = Path(directory) / MARKER
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except FileExistsError:
        if path.is_symlink() or not path.is_file():
            raise ForcelabError(f"{path}: not forcelab's marker (a link or a folder); remove it") from None
        return
    try:
        record = {"written_by": "forcelab", "version": __version__, **({"kind": kind} if kind else {})}
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def remove_directory(path: str | os.PathLike) -> None:
    """Delete a folder forcelab wrote (e.g. an old checkpoint); anything else is refused.

    The folder is renamed to a temporary name first: a kill during the deletion leaves a
    temporary (cleaned by the next write into the folder), never a partial `path`."""
    path = Path(path).expanduser()
    if path.is_symlink():
        raise ForcelabError(f"{path}: a symbolic link (to {os.readlink(path)}); forcelab does not delete "
                            f"through links - remove the link yourself (what it points to is kept)")
    if not written_by_forcelab(path):
        raise ForcelabError(f"{path}: not written by forcelab (no {MARKER} marker); not deleting it")
    doomed = _tmp_name(path)
    os.rename(path, doomed)
    _step("remove-renamed")
    shutil.rmtree(doomed)


# ---------------------------------------------------------------------- recovery
def recover(path: str | os.PathLike) -> Path:
    """Finish an interrupted swap of directory `path` (safe for readers: acts only when `path`
    is missing and forcelab's complete new copy, or the old one, lies beside it)."""
    path = Path(path).expanduser()
    if path.exists() or path.is_symlink():
        return path
    for candidate in (_new(path), _old(path)):  # roll forward if the new copy is complete
        if written_by_forcelab(candidate):
            try:
                os.rename(candidate, path)
            except FileNotFoundError:  # a concurrent reader may have won
                pass
            except OSError as e:
                raise ForcelabError(f"{path}: an interrupted save left {candidate.name} beside it, which cannot "
                                    f"be moved into place ({e.strerror}); rename it to {path.name}") from None
            if path.exists():
                break
    return path


def _tidy(path: Path) -> None:
    """Writer-side recovery: restore `path`, then delete forcelab's leftovers around it."""
    recover(path)
    if path.exists():
        for leftover in (_new(path), _old(path)):
            if written_by_forcelab(leftover):
                _remove(leftover)
    clean_stale(path.parent)


# ---------------------------------------------------------------------- checks
def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK | os.X_OK)


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Check that `path` can be a folder forcelab writes into, before any work.

    `~` is expanded. The folder may exist (a directory we can write) or not (then its nearest
    existing parent must be a directory we can write). Returns the expanded path."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ForcelabError(f"{what} {path}: is a file, not a folder; give a folder path")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise ForcelabError(f"{what} {path}: {base} is a file, so this folder cannot be created; "
                            f"give another path")
    if not _writable(base):
        where = "this folder" if base == path else f"its parent {base}"
        raise ForcelabError(f"{what} {path}: {where} is not writable; choose a writable location "
                            f"or fix its permissions")
    return path


def check_new_directory(path: str | os.PathLike, what: str, *, overwrite: bool = True) -> Path:
    """Check, before any work, that atomic_directory(path, overwrite=overwrite) may write `path`."""
    path = check_output_dir(path, what)
    recover(path)
    if path.is_symlink():
        raise ForcelabError(f"{what} {path}: a symbolic link (to {os.readlink(path)}); forcelab does not "
                            f"replace links - remove it or choose another folder")
    if path.exists() and not _is_empty_dir(path):
        if not written_by_forcelab(path):
            raise ForcelabError(f"{what} {path}: exists and was not written by forcelab (no {MARKER} "
                                f"marker); forcelab never replaces it - choose a new folder")
        if not overwrite:
            raise ForcelabError(f"{what} {path}: exists (an earlier forcelab output); choose a new "
                                f"folder or allow replacing it (--overwrite)")
    return path


# ---------------------------------------------------------------------- directories
def current_umask() -> int:
    try:  # Linux: read it without changing it (os.umask can only be read by setting it)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(root: Path) -> None:
    """Give what a library wrote under `root` the modes of the umask: some writers (safetensors)
    create private 0600 files, which other users of a shared checkpoint could not read."""
    mask = current_umask()
    for dirpath, dirs, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in files:
            f = os.path.join(dirpath, name)
            if not os.path.islink(f):
                executable = os.stat(f).st_mode & 0o100
                os.chmod(f, (0o777 if executable else 0o666) & ~mask)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = True,
                     what: str = "output") -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on normal exit it becomes `path`.

    An existing `path` is checked at entry, before any work: an empty folder, or a folder
    forcelab wrote (its MARKER; unless overwrite=False), is replaced by the recoverable swap
    described in the module docstring; anything else raises ForcelabError. On an exception
    the temporary is deleted and `path` is untouched. Delete old outputs (e.g. rotated
    checkpoints) only where written_by_forcelab(path) holds."""
    path = Path(path).expanduser()
    check_new_directory(path, what, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    _tidy(path)
    tmp = _tmp_name(path)
    os.mkdir(tmp)  # mode 0o777 & ~umask
    _step("tmp-created")
    try:
        yield tmp
        mark(tmp)
        _step("written")
        _apply_umask(tmp)
        _fsync_tree(tmp)
        # the existing folder may have changed while we worked: check again before replacing
        check_new_directory(path, what, overwrite=overwrite)
        new = _new(path)
        if written_by_forcelab(new):
            _remove(new)
        os.rename(tmp, new)
    except BaseException:
        _remove(tmp)
        raise
    _step("ready")
    if path.exists():
        old = _old(path)
        if written_by_forcelab(old):
            _remove(old)
        if _is_empty_dir(path):
            path.rmdir()
        else:
            os.rename(path, old)
            _step("old-moved")
    with contextlib.suppress(FileNotFoundError):  # a reader's recover() may have moved it already
        os.rename(new, path)
    _step("new-moved")
    _fsync_dir(path.parent)
    if written_by_forcelab(_old(path)):
        _remove(_old(path))
    _step("done")


# ---------------------------------------------------------------------- links
def own_file(path: str | os.PathLike, what: str = "output") -> Path:
    """The file to write for `path`: `path` itself, or, when it is a symbolic link to a file in
    the same folder tree, the file it names. A link leading out of its folder is refused: it
    would make forcelab overwrite (or append to) a file it did not write."""
    path = Path(path).expanduser()
    if not path.is_symlink():
        return path
    folder, target = path.parent.resolve(), path.resolve()
    if folder not in target.parents:
        raise ForcelabError(f"{what} {path}: a symbolic link to {target}, outside its folder; forcelab does "
                            f"not write through it - remove the link (its target is kept)")
    return target


# ---------------------------------------------------------------------- files
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True, what: str = "output") -> Iterator[Path]:
    """Yield the name of an empty temporary file beside `path` (for writers that open files by
    name: tarfile, PyAV); on normal exit it is fsynced and renamed to `path`, so a reader sees
    the old file or the new one, never a partial one. On an exception it is deleted.

    overwrite=False: an existing `path` is an error, checked at entry and again (atomically,
    by a hard link) when the file is put in place. A `path` that is a symbolic link out of its
    folder is refused (own_file)."""
    path = own_file(path, what)
    if path.is_dir():
        raise ForcelabError(f"{what} {path}: is a folder, not a file; give a file path")
    if not overwrite and path.exists():
        raise ForcelabError(f"{what} {path}: exists; forcelab does not replace it - choose another name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0o666 & ~umask
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if `path` appeared meanwhile: never replaced
                os.unlink(tmp)
            except FileExistsError:
                raise ForcelabError(f"{what} {path}: appeared while writing; forcelab does not "
                                    f"replace it - choose another name") from None
            except OSError:  # a filesystem without hard links: check, then rename
                if path.exists():
                    raise ForcelabError(f"{what} {path}: appeared while writing; forcelab does not "
                                        f"replace it - choose another name") from None
                os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename in (None, str(tmp)):
            raise OSError(e.errno, e.strerror, str(path)) from e   # a full disk names the file being written
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator:
    """Like atomic_path, yielding the temporary opened in `mode` ("wb", or "w" for UTF-8 text)."""
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_file: mode must be 'w', 'wt' or 'wb', got {mode!r}")
    with atomic_path(path, **kwargs) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f


def write_text_atomic(path: str | os.PathLike, text: str, **kwargs) -> Path:
    with atomic_file(path, "w", **kwargs) as f:
        f.write(text)
    return Path(path).expanduser()


def append_text(path: str | os.PathLike, text: str, what: str = "log") -> None:
    """Append `text` to a log file (created with the umask); a symbolic link out of its folder is
    refused (own_file), also when it appears between the check and the write (O_NOFOLLOW)."""
    target = own_file(path, what)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            own_file(target, what)   # a link appeared: refused with the same message
        raise
    try:
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- OS errors
_WHAT_TO_DO = {
    errno.ENOSPC: "free space on that disk (or choose a folder on another one)",
    errno.EDQUOT: "free space under your quota (or choose a folder on another disk)",
    errno.EROFS: "choose a folder on a writable file system",
    errno.EACCES: "fix the folder's permissions or choose another folder",
    errno.EPERM: "fix the folder's permissions or choose another folder",
    errno.EIO: "check the disk or the network mount",
}


def os_error_message(e: OSError, what: str = "", path: str | os.PathLike | None = None) -> str:
    """One line for an OSError: the path, what went wrong, and what to do."""
    path = path if path is not None else e.filename   # the caller's name, not a temporary's
    where = " ".join(str(x) for x in (what, path) if x)
    todo = _WHAT_TO_DO.get(e.errno, "check the path and the storage")
    return f"{where or 'a file'}: {e.strerror or e}; {todo}"


# ---------------------------------------------------------------------- output folders
def _contents(path: Path) -> list[Path]:
    """What a folder holds besides forcelab's marker and lock."""
    return [p for p in path.iterdir() if p.name not in (MARKER, LOCK)] if path.is_dir() else []


def claim_directory(path: str | os.PathLike, what: str, kind: str) -> Path:
    """A folder that accumulates forcelab's outputs of one `kind` (the demo's and the study's
    --out): it may be new, empty, or one forcelab wrote before for the same kind (its marker); a
    folder holding other files, or marked as another kind, is refused before any work, like
    `convert` refuses it. Creates and marks it; returns it."""
    path = check_output_dir(path, what)
    check_kind(path, kind, what)
    if path.is_symlink() and not path.is_dir():
        raise ForcelabError(f"{what} {path}: a broken symbolic link; remove it or choose another folder")
    if _contents(path) and not written_by_forcelab(path):
        raise ForcelabError(f"{what} {path}: exists and was not written by forcelab (no {MARKER} marker); "
                            f"forcelab never writes among other files - choose a new or empty folder")
    path.mkdir(parents=True, exist_ok=True)
    if not written_by_forcelab(path):
        mark(path, kind)
    return path


# ---------------------------------------------------------------------- reading text
def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file (a leading BOM, as spreadsheet programs write, is dropped).

    Not UTF-8: ForcelabError naming the file and the line of the first bad byte."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ForcelabError(f"{what} {path}: file not found") from None
    except IsADirectoryError:
        raise ForcelabError(f"{what} {path}: is a folder; give a text file") from None
    except OSError as e:
        raise ForcelabError(f"{what} {path}: cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ForcelabError(f"{what} {path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column "
                            f"{column}); save the file as UTF-8") from None
