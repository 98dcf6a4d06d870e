"""What preprocess reads: a folder of videos with sidecar captions, a CSV/JSONL manifest of
path,caption rows, or a prompt list (.txt, or CSV/JSONL with a caption or prompt column).

Each input becomes an Item in list order (its index is the sample key). An input that cannot be
used (missing, a dangling link, no caption, a caption that is a list or holds a NUL byte, a CSV
row with more cells than columns, a row without a usable path) is kept with its `problem`, so
preprocess can skip and record it. A manifest is the user's own word: absolute paths and paths
outside its folder are accepted; relative ones start from --root (default: its folder).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ForcelabError
from ..fsio import read_text
from .video import VIDEO_SUFFIXES

EXTRA_CELLS = "__extra_cells__"   # a CSV row's cells past the header's columns (csv gives them the key None)


@dataclass
class Item:
    index: int              # position in the input list: the sample key
    source: str             # video path (or "prompt:<index>")
    caption: str | None     # None: no caption found (skipped)
    problem: str | None = None  # why the input cannot be used (skipped and recorded)


def _read_rows(path: Path, flag: str) -> list[dict]:
    """Rows of a CSV (with a header) or JSONL file (UTF-8, a BOM is fine)."""
    text = read_text(path, flag)
    if path.suffix.lower() == ".csv":
        try:
            rows = csv.DictReader(io.StringIO(text, newline=""))
            return [{(EXTRA_CELLS if k is None else k): v for k, v in row.items()} for row in rows]
        except csv.Error as e:
            raise ForcelabError(f"{flag} {path}: not a valid CSV ({e}); write a header line path,caption") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ForcelabError(f"{path}:{n}: not valid JSON ({e}); one JSON object per line") from None
            if not isinstance(row, dict):
                raise ForcelabError(f"{path}:{n}: expected a JSON object like {{\"path\": ..., \"caption\": ...}}")
            rows.append(row)
    return rows


def _caption(row: dict, where: str) -> tuple[str | None, str | None]:
    """(caption, problem) of a manifest or prompt row ('caption', else 'prompt').

    A caption must be one text. A list (several captions per clip, as some data sets have) is
    refused with a record rather than joined: a joined string is a caption no one wrote and the
    model would learn text it will never be prompted with; pick one per row or write one row
    per caption. Other types (numbers, objects) are refused the same way, never stored as repr."""
    if EXTRA_CELLS in row:
        return None, (f"{where}: {len(row[EXTRA_CELLS])} more cell(s) than the header has columns "
                      f"({row[EXTRA_CELLS]!r}); a caption with a comma needs quotes: \"a red ball, bouncing\"")
    text = row.get("caption", row.get("prompt"))
    if text is None:
        return None, None
    if not isinstance(text, str):
        kind = f"a list of {len(text)}" if isinstance(text, list) else f"a {type(text).__name__}"
        return None, (f"{where}: the caption is {kind}, not one text; give one caption per row (pick one, "
                      f"or write one row per caption)")
    return _text(text, where)


def _text(text: str, where: str) -> tuple[str | None, str | None]:
    """(stripped text or None, problem): a NUL byte marks a damaged or binary caption."""
    if "\0" in text:
        return None, f"{where}: the caption holds a NUL byte (a damaged or binary file?); fix the text"
    return text.strip() or None, None


def _manifest_item(i: int, row: dict, root: Path, where: str) -> Item:
    """A manifest row -> Item; a row without a usable path is kept as a problem (skipped).

    The manifest is the user's own word: absolute paths and paths outside its folder are
    accepted; relative ones resolve against `root` (--root, default the manifest's folder)."""
    raw = row.get("path")
    if not isinstance(raw, str) or not raw.strip():
        return Item(i, f"{where}", None, f"{where}: 'path' must be a file name, got {raw!r}")
    if "\0" in raw:
        return Item(i, where, None, f"{where}: path {raw!r} holds a NUL byte; fix the manifest row")
    path = root / Path(raw.strip()).expanduser()
    caption, problem = _caption(row, where)
    return Item(i, str(path), caption, _file_problem(path) or problem)


def _sidecar_caption(video: Path) -> tuple[str | None, str | None]:
    """(caption, problem) from video.txt beside the video."""
    txt = video.with_suffix(".txt")
    if not txt.is_file():
        return None, None
    try:
        return _text(read_text(txt, "caption"), str(txt))
    except ForcelabError as e:
        return None, str(e)


def _file_problem(p: Path) -> str | None:
    """Why an input path cannot be read as a video file (None: a file, or nothing there at all,
    which the video reader reports). A FIFO or device is never opened: reading it could block."""
    if p.is_file():
        return None
    if p.is_symlink() and not p.exists():
        return f"{p}: a symlink to {os.readlink(p)}, which does not exist; fix or remove the link"
    return f"{p}: not a regular file" if p.exists() else None


def _folder_item(i: int, p: Path) -> Item:
    """A video found in a folder; one that cannot be a file (a dangling symlink, a folder or
    device named like a video) is kept with its problem, so it is recorded, not lost."""
    problem = _file_problem(p)
    return Item(i, str(p), None, problem) if problem else Item(i, str(p), *_sidecar_caption(p))


def list_videos(videos: str, root: str | None = None) -> list[Item]:
    """A folder (recursive, sorted, sidecar .txt captions) or a CSV/JSONL manifest (relative
    paths against `root`, default the manifest's folder)."""
    path = Path(videos).expanduser()
    if root is not None and not (path.is_file() and path.suffix.lower() in (".csv", ".jsonl")):
        raise root_alone(root)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES
                       and (p.is_symlink() or not p.is_dir()))
        items = [_folder_item(i, p) for i, p in enumerate(files)]
        if not items:
            raise ForcelabError(f"--videos {videos}: no video files ({', '.join(VIDEO_SUFFIXES)}) in this folder")
        return items
    if path.is_file() and path.suffix.lower() in (".csv", ".jsonl"):
        base = Path(root).expanduser() if root is not None else path.parent
        if not base.is_dir():
            raise ForcelabError(f"--root {root}: not a folder; give the folder that the manifest's relative "
                                f"paths start from")
        rows = _read_rows(path, "--videos")
        if not rows:
            raise ForcelabError(f"--videos {videos}: no inputs in this manifest (empty, or a header only); "
                                f"add rows of path,caption")
        if path.suffix.lower() == ".csv" and "path" not in rows[0]:
            raise ForcelabError(f"--videos {videos}: the manifest needs a 'path' column (and 'caption'); "
                                f"it has {sorted(rows[0])}")
        return [_manifest_item(i, r, base, f"{path.name}:{i + (2 if path.suffix.lower() == '.csv' else 1)}")
                for i, r in enumerate(rows)]
    what = f"a {path.suffix or 'suffix-less'} file, not a manifest" if path.exists() else "not found"
    raise ForcelabError(f"--videos {videos}: {what} - give a folder of videos with .txt captions "
                        f"or a .csv/.jsonl manifest with path,caption")


def root_alone(root: str) -> ForcelabError:
    return ForcelabError(f"--root {root}: applies to a .csv/.jsonl manifest given to --videos; drop it")


def list_prompts(prompts: str) -> list[Item]:
    """A .txt file (one prompt per line) or a CSV/JSONL with a caption or prompt column."""
    path = Path(prompts).expanduser()
    if not path.is_file():
        raise ForcelabError(f"--prompts {prompts}: file not found")
    if path.suffix.lower() in (".csv", ".jsonl"):
        rows = _read_rows(path, "--prompts")
        texts = [_caption(r, f"{path.name}:{i + 1}") for i, r in enumerate(rows)]
    else:
        lines = [line for line in read_text(path, "--prompts").splitlines() if line.strip()]
        texts = [_text(line, f"{path.name}:{i + 1}") for i, line in enumerate(lines)]
    if not any(t or problem for t, problem in texts):
        raise ForcelabError(f"--prompts {prompts}: no prompts in this file")
    return [Item(i, f"{path.name}:{i + 1}", t, problem or (None if t else empty_prompt(f"{path.name}:{i + 1}")))
            for i, (t, problem) in enumerate(texts)]


def empty_prompt(source: str) -> str:
    """The record of a blank prompt row (a read prompt list passes over these; preprocess records them)."""
    return f"{source}: empty prompt"
