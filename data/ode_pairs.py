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
from .shards import ShardDataset, shard_urls, write_record, write_shard


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
        entries.append({"name": name, "samples": write_record(out / name, write_shard(out / name, buffer))["samples"]})
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
    """A ShardDataset of ODE pairs (every sample must have its trajectory)."""
    return ShardDataset(source, require=("ode",), **kwargs)


class ODEPairs(Dataset):
    """ODE pairs by index, in key order, over every manifest.json under `source` (a folder,
    searched recursively: several writers' sub-folders form one set) or one manifest.

    Only the tar member offsets are kept in memory; a sample is read from its shard on access,
    so a large pair set costs no RAM and an index always names the same pair (position-
    addressed training data: resume and data-parallel runs read exactly the same samples)."""

    def __init__(self, source, dtype: torch.dtype = torch.float32):
        path = Path(source)
        manifests = sorted(path.rglob("manifest.json")) if path.is_dir() else [path]
        if not manifests:
            raise DataError(f"ODE pairs {source}: no manifest.json found; generate the pairs first "
                            f"(the ode_init recipe writes them)")
        members: dict[str, dict[str, tuple[str, int, int]]] = {}
        for url in (u for m in manifests for u in shard_urls(m)):
            try:
                with tarfile.open(url) as tar:
                    for info in tar.getmembers():
                        key, _, member = info.name.partition(".")
                        members.setdefault(key, {})[member] = (url, info.offset_data, info.size)
            except (OSError, tarfile.TarError) as e:
                raise DataError(f"shard {url}: unreadable ({e}); delete it and generate the pairs again") from None
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
        return decode_sample(raw, require=("ode",), dtype=self.dtype)
