"""The VBench prompt suite shipped with forcelab (data/vbench/, Apache-2.0, from VBench).

    names, texts, info = select_prompts()                                   # all 946 (944 distinct)
    names, texts, info = select_prompts(["temporal_flickering"], extended=True)

names are the original prompts (VBench names the files "{name}-{i}.mp4" and finds them by
these), texts what the model is conditioned on: the same prompts, or the Wan2.1-extended
ones (line-aligned). Two prompts appear twice in the suite; each file is generated once and
VBench scores it under both entries.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from ..errors import ForcelabError
from .vbench import check_dimensions

SUITE_DIR = Path(__file__).resolve().parent / "data" / "vbench"
PROMPTS_FILE = "all_dimension.txt"
EXTENDED_FILE = "all_dimension_aug_wan2.1_seed42.txt"
FULL_INFO_FILE = "VBench_full_info.json"
SUITE_SOURCE = "VBench (Vchitect/VBench 45e79ec), Apache-2.0"


@lru_cache(maxsize=1)
def full_info() -> tuple[dict, ...]:
    """VBench_full_info.json: [{"prompt_en", "dimension": [...], "auxiliary_info"?}], in suite order."""
    return tuple(json.loads((SUITE_DIR / FULL_INFO_FILE).read_text(encoding="utf-8")))


def _lines(name: str) -> list[str]:
    return (SUITE_DIR / name).read_text(encoding="utf-8").splitlines()


def select_prompts(dimensions=None, extended: bool = False) -> tuple[list[str], list[str], dict]:
    """(names, texts, info) of the suite's prompts for `dimensions` (VBench names; None: all).
    info records what was chosen, for the sidecars and every result."""
    dims = None if dimensions is None else check_dimensions(dimensions)
    info_rows = full_info()
    originals = _lines(PROMPTS_FILE)
    texts_all = _lines(EXTENDED_FILE) if extended else originals
    if [r["prompt_en"] for r in info_rows] != originals or len(texts_all) != len(originals):
        raise ForcelabError(f"the bundled VBench suite in {SUITE_DIR} is inconsistent (prompt files not "
                            f"line-aligned with {FULL_INFO_FILE}); reinstall forcelab")
    names, texts, seen = [], [], set()
    for row, text in zip(info_rows, texts_all):
        if dims is not None and not set(dims) & set(row["dimension"]):
            continue
        if row["prompt_en"] in seen:
            continue
        seen.add(row["prompt_en"])
        names.append(row["prompt_en"])
        texts.append(text)
    info = {"suite": SUITE_SOURCE, "prompts_file": EXTENDED_FILE if extended else PROMPTS_FILE,
            "names_file": PROMPTS_FILE, "extended": bool(extended), "dimensions": dims or "all",
            "prompts": len(names)}
    return names, texts, info


def parse_dimension_list(text: str) -> list[str] | None:
    """"all" -> None; "a,b" or "a b" -> validated dimension names."""
    items = [t for t in text.replace(",", " ").split() if t]
    if not items or items == ["all"]:
        return None
    return check_dimensions(items)
