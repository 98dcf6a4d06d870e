"""Webdataset shards: write them atomically, read them as a shuffled, split, validated stream.

    ds = ShardDataset("data/latents", shuffle=1000, seed=0)            # one pass per epoch
    ds = ShardDataset("data/latents", resampled=True, samples_per_epoch=10_000)  # infinite data
    loader = shard_loader(ds, batch_size=8, num_workers=2)              # batches (schema.collate)
    for epoch in range(n): ds.set_epoch(epoch); for batch in loader: ...

Splitting: shards are shuffled with a seed shared by all ranks (seed, epoch), then dealt out
by rank (wds.split_by_node) and by DataLoader worker (wds.split_by_worker), so ranks read
disjoint shards that together cover the data set; give each rank at least as many shards as
it has workers (preprocess writes at least one shard per rank). Samples are then shuffled
in a buffer seeded by (seed, epoch, rank, worker). Resampled mode draws shards with
replacement per rank and worker (no split: the stream is infinite, `samples_per_epoch`
bounds an epoch per rank). Call set_epoch(e) for a new order each epoch.

With accelerate: do not pass these loaders through accelerator.prepare() - it wraps iterable
datasets in IterableDatasetShard and would split each rank's (already split) stream again,
dropping data. Move batches to the device yourself.
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
import tarfile
from pathlib import Path
from typing import Callable, Iterable

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from .schema import DataError, collate, decode_sample

SHARD_SUFFIX = ".tar"


def write_shard(path: str | Path, samples: Iterable[dict[str, bytes]]) -> int:
    """Write samples ({"__key__": key, member: bytes}) as a tar, atomically (tmp + rename).

    A crash leaves at most a *.tar.tmp, never a partial *.tar. Returns the sample count."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            for member in sorted(k for k in sample if not k.startswith("__")):
                data = sample[member]
                info = tarfile.TarInfo(f"{key}.{member}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
            n += 1
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n


def shard_urls(source: str | Path | list) -> list[str]:
    """Shard paths from: a directory (its *.tar, sorted, not recursive), a preprocess manifest.json,
    one .tar, a brace pattern ("shards/part-{000..009}.tar"), or a list of any of these."""
    if isinstance(source, (list, tuple)):
        return [u for s in source for u in shard_urls(s)]
    source = str(source)
    path = Path(source)
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob(f"*{SHARD_SUFFIX}"))
        if not urls:
            raise DataError(f"{source}: no *{SHARD_SUFFIX} shards in this directory; run forcelab preprocess first")
        return urls
    if path.suffix == ".json" and path.is_file():
        try:
            manifest = json.loads(path.read_text())
            return [str(path.parent / s["name"]) for s in manifest["shards"] if s["samples"] > 0]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{source}: not a preprocess manifest ({type(e).__name__}: {e})") from None
    if "{" in source:
        urls = list(wds.shardlists.expand_urls(source))
        missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
        if missing:
            raise DataError(f"{source}: {len(missing)} shard(s) not found, e.g. {missing[0]}")
        return urls
    if path.is_file():
        return [source]
    raise DataError(f"{source}: not found - give a shard directory, a manifest.json, a .tar or a brace pattern")


def _raise_shard_error(exn: Exception) -> bool:
    """webdataset handler: re-raise with the shard named (wds appends (stream, url) to exn.args)."""
    if isinstance(exn, DataError):
        raise exn
    url = next((a for a in reversed(exn.args) if isinstance(a, str) and a.endswith(SHARD_SUFFIX)), None)
    first = str(exn.args[0]) if exn.args else type(exn).__name__
    raise DataError(f"shard {url or '?'}: unreadable ({type(exn).__name__}: {first}); the file is truncated "
                    f"or corrupt - delete it and re-run preprocess (finished shards are kept)") from None


def check_complete(src):
    """Pipeline stage: a local shard must end with tar's end-of-archive blocks (1024 zero bytes).

    A tar cut at a member boundary otherwise reads as a shorter, valid-looking shard."""
    for item in src:
        url = item["url"]
        if "://" not in url and os.path.isfile(url):
            size = os.path.getsize(url)
            with open(url, "rb") as f:
                f.seek(max(size - 1024, 0))
                tail = f.read()
            if size % 512 or size < 1024 or tail.count(0) != len(tail):
                raise DataError(f"shard {url}: truncated ({size} bytes, no end-of-archive marker); delete it and "
                                f"re-run preprocess (finished shards are kept)")
        yield item


def _seed(*parts: int) -> int:
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2**61 - 1)
    return s


class ShardDataset(IterableDataset):
    """Schema samples from webdataset shards (see the module docstring).

    decode: raw tar members -> sample (default: schema.decode_sample requiring `require`).
    split_by_node: False reads every shard on every rank (evaluation on one process).
    """

    def __init__(self, source, *, shuffle: int = 1000, seed: int = 0, resampled: bool = False,
                 samples_per_epoch: int | None = None, split_by_node: bool = True,
                 require: tuple[str, ...] = ("latent",), dtype: torch.dtype = torch.float32,
                 decode: Callable[[dict], dict] | None = None):
        self.urls = shard_urls(source)
        self.shuffle, self.seed, self.resampled = shuffle, seed, resampled
        if resampled and not samples_per_epoch:
            raise DataError("ShardDataset: resampled=True is infinite - set samples_per_epoch")
        self.samples_per_epoch, self.split_by_node = samples_per_epoch, split_by_node
        self.decode = decode or functools.partial(decode_sample, require=require, dtype=dtype)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def pipeline(self) -> wds.DataPipeline:
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        if self.resampled:
            # wds seeds ResampledShards with (rank, worker, its own epoch count, seed)
            stages = [wds.ResampledShards(self.urls, seed=_seed(self.seed, self.epoch), deterministic=True)]
        else:
            urls = list(self.urls)
            if self.shuffle:
                random.Random(_seed(self.seed, self.epoch)).shuffle(urls)
            stages = [wds.SimpleShardList(urls)]
            if self.split_by_node:
                stages.append(wds.split_by_node)
            stages.append(wds.split_by_worker)
        stages += [check_complete, wds.tarfile_to_samples(handler=_raise_shard_error)]
        if self.shuffle:
            stages.append(wds.shuffle(self.shuffle, initial=min(self.shuffle, 100),
                                      seed=_seed(self.seed, self.epoch, rank, worker, 1)))
        stages.append(wds.map(self.decode))
        pipe = wds.DataPipeline(*stages)
        if self.resampled:
            per_rank = self.samples_per_epoch
            pipe = pipe.with_epoch(per_rank // workers + (worker < per_rank % workers))
        return pipe

    def __iter__(self):
        return iter(self.pipeline())

    def __len__(self) -> int:  # only meaningful for resampled (fixed-size) epochs
        if not self.resampled:
            raise TypeError("ShardDataset has no length unless resampled (count samples in manifest.json)")
        return self.samples_per_epoch


def shard_loader(dataset: IterableDataset, batch_size: int, num_workers: int = 0,
                 drop_last: bool = False, **kwargs) -> DataLoader:
    """A DataLoader batching schema samples with schema.collate."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                      drop_last=drop_last, persistent_workers=False, **kwargs)


def count_samples(source) -> int:
    """Samples in a preprocess output folder or manifest (from manifest.json, without reading tars)."""
    path = Path(source)
    manifest = path / "manifest.json" if path.is_dir() else path
    try:
        return int(json.loads(manifest.read_text())["counts"]["written"])
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{manifest}: cannot read the sample count ({type(e).__name__}: {e})") from None
