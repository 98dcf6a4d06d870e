"""ODE pairs: teacher sampling trajectories kept at chosen steps, for ODE-regression init.

CausVid / Self-Forcing initialise the causal student by regressing the teacher's deterministic
ODE solution: from noise x_T, the teacher's sampler (many steps, CFG) gives latents at a few
chosen timesteps down to x0. A pair sample stores that trajectory:

    ode_latents    [S, C, F, H, W]   latents at the chosen steps, noise first, x0 last
    ode_timesteps  [S]               their timesteps (sigma * 1000; 0 for x0)
    text_emb, text_len, caption, meta as in every sample (data/schema.py)

    write_ode_pairs("data/ode", samples)             # the teacher-side recipe produces samples
    ds = ode_pair_dataset("data/ode", shuffle=256)    # ShardDataset of such samples (a stream)
    pairs = ODEPairs("data/ode"); pairs[3]            # map-style: sample by index, read on access
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Iterable

import torch
from torch.utils.data import Dataset

from ..errors import ForcelabError
from ..fsio import write_text_atomic
from .schema import DataError, decode_sample, encode_sample
from .shards import (ShardDataset, check_tar_end, sample_problem, shard_problem, shard_record, shard_urls,
                     write_record, write_shard)


def write_ode_pairs(out: str | Path, samples: Iterable[dict], shard_size: int = 256, dtype: str = "bf16",
                    first_index: int = 0) -> dict:
    """Write samples {ode_latents, ode_timesteps, text_emb, text_len, caption[, meta]} as shards
    ode-K.tar in `out` (each with its ode-K.json record: count, size, sha256) plus a manifest.json
    (readable by shard_urls / ShardDataset, which verify the records).

    Keys are first_index + i; several writers (ranks) can share a folder with distinct
    first_index ranges and shard names (pass out/rank folders otherwise). Returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries, buffer, total = [], [], 0

    def flush():
        name = f"ode-{first_index + total - len(buffer):09d}.tar"
        write_shard(out / name, buffer)
        entries.append({"name": name, "samples": write_record(out / name, buffer)["samples"]})
        buffer.clear()

    for i, s in enumerate(samples):
        lat, steps = s["ode_latents"], torch.as_tensor(s["ode_timesteps"], dtype=torch.float32)
        if lat.ndim != 5 or steps.shape != lat.shape[:1]:
            raise ForcelabError(f"ODE pair {i}: ode_latents must be [S, C, F, H, W] with ode_timesteps [S], "
                                f"got {list(lat.shape)} and {list(steps.shape)}")
        meta = dict(s.get("meta", {}), caption=s["caption"], steps=steps.tolist(), shape=list(lat.shape[1:]))
        meta.setdefault("text_max_length", s["text_emb"].shape[0])
        buffer.append(encode_sample(f"{first_index + i:09d}", ode_latents=lat, ode_timesteps=steps,
                                    text_emb=s["text_emb"], text_len=int(s["text_len"]), meta=meta, dtype=dtype))
        total += 1
        if len(buffer) == shard_size:
            flush()
    if buffer:
        flush()
    manifest = {"kind": "ode_pairs", "counts": {"written": total, "shards": len(entries), "skipped": 0},
                "shards": entries, "skipped": []}
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def ode_pair_dataset(source, **kwargs) -> ShardDataset:
    """A ShardDataset of ODE pairs (every sample must have its trajectory), verified like any shards."""
    return ShardDataset(source, require=("ode",), **kwargs)


def _listed_shards(manifest: Path) -> list[tuple[str, int | None]]:
    """(shard path, sample count the manifest lists for it, or None) of a manifest or a .tar."""
    urls, listed = shard_urls(manifest), {}
    if manifest.suffix == ".json":
        try:
            listed = {str(manifest.parent / Path(e["name"]).name): int(e["samples"])
                      for e in json.loads(manifest.read_text(encoding="utf-8"))["shards"]}
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
            listed = {}
    return [(u, listed.get(u)) for u in urls]


class ODEPairs(Dataset):
    """ODE pairs by index, in key order, over every manifest.json under `source` (a folder,
    searched recursively: several writers' sub-folders form one set) or one manifest.

    Only the tar member offsets are kept in memory; a sample is read from its shard on access,
    so a large pair set costs no RAM and an index always names the same pair (position-
    addressed training data: resume and data-parallel runs read exactly the same samples).

    Verified like ShardDataset: at open, each shard's size and sample count against its record
    (ode-K.json; the count against manifest.json where the record is gone) and its end-of-archive
    marker; on access, the pair's sha256 against the record.
    A mismatch is a DataError naming the shard (and the pair's key). There is no skipping here:
    leaving one pair out would shift every later index."""

    def __init__(self, source, dtype: torch.dtype = torch.float32):
        path = Path(source)
        manifests = sorted(path.rglob("manifest.json")) if path.is_dir() else [path]
        if not manifests:
            raise DataError(f"ODE pairs {source}: no manifest.json found; generate the pairs first "
                            f"(the ode_init recipe writes them)")
        members: dict[str, dict[str, tuple[str, int, int]]] = {}
        self.digests: dict[str, dict] = {}  # shard -> {key: sha256} from its record
        for url, listed in (pair for m in manifests for pair in _listed_shards(m)):
            record = shard_record(url)
            problem = shard_problem(url, record, verify="size")
            if problem:
                raise DataError(f"shard {url}: {problem}; delete it and generate the pairs again")
            check_tar_end(url, fix="generate the pairs again")
            keys = set()
            try:
                with tarfile.open(url) as tar:
                    for info in tar.getmembers():
                        key, _, member = info.name.partition(".")
                        members.setdefault(key, {})[member] = (url, info.offset_data, info.size)
                        keys.add(key)
            except (OSError, tarfile.TarError) as e:
                raise DataError(f"shard {url}: unreadable ({e}); delete it and generate the pairs again") from None
            expected = record["samples"] if record is not None else listed
            if expected is not None and len(keys) != expected:
                raise DataError(f"shard {url}: {len(keys)} pairs, its record says {expected}; the shard is "
                                f"damaged - delete it and generate the pairs again")
            if record is not None and isinstance(record.get("sample_sha256"), dict):
                self.digests[url] = record["sample_sha256"]
        self.keys = sorted(members)
        self.members, self.dtype = members, dtype

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        key = self.keys[i]
        raw = {"__key__": key}
        for member, (url, offset, size) in self.members[key].items():
            with open(url, "rb") as f:
                f.seek(offset)
                raw[member] = f.read(size)
            raw["__url__"] = url
        problem = sample_problem(raw, self.digests.get(raw["__url__"]))
        if problem:
            raise DataError(f"shard {raw['__url__']}, pair {key}: {problem}; delete the shard and generate "
                            f"the pairs again")
        return decode_sample(raw, require=("ode",), dtype=self.dtype)
