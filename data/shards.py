"""Webdataset shards: write them atomically, read them as a shuffled, split, validated stream.

    ds = ShardDataset("data/latents", shuffle=1000, seed=0)            # one pass per epoch
    ds = ShardDataset("data/latents", resampled=True, samples_per_epoch=10_000)  # infinite data
    loader = shard_loader(ds, batch_size=8, num_workers=2)              # batches (schema.collate)
    for epoch in range(n): ds.set_epoch(epoch); for batch in loader: ...

Verification: preprocess records in shard-k.json beside shard-k.tar the shard's sample count,
size and sha256, and the sha256 of every sample (its members' names and bytes). Opening a
dataset checks every recorded shard's size (verify="size", the default: a stat per shard)
or also its whole-file checksum (verify="checksum": reads every shard once); "none" skips that.
While reading, always, at no extra read: each sample's bytes are hashed as they stream past and
compared with the record, so a byte changed inside a stored latent is caught when its sample is
read; a shard that yields fewer or more samples than recorded, or lacks tar's end-of-archive
marker, is a DataError naming it. on_damage says what a damaged SAMPLE (checksum differs, or it
does not decode) does: "stop" (the default: a DataError naming the shard and the sample key -
training on data that is not what was written is never silent) or "skip" (the sample is left
out and one line naming shard, key and problem goes to stderr; `damaged` lists them when
reading in this process). Shards without a record (other tools' tars) have nothing to check.

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
import hashlib
import io
import json
import os
import random
import sys
import tarfile
from pathlib import Path
from typing import Callable, Iterable

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from ..fsio import atomic_path, write_text_atomic
from ..seeds import stream_seed
from .schema import DataError, collate, decode_sample

SHARD_SUFFIX = ".tar"
RECORD_SUFFIX = ".json"     # shard-k.json: what preprocess put into shard-k.tar
VERIFY_MODES = ("none", "size", "checksum")
ON_DAMAGE = ("stop", "skip")
_HASH_BLOCK = 2**22


def write_shard(path: str | Path, samples: Iterable[dict[str, bytes]]) -> int:
    """Write samples ({"__key__": key, member: bytes}) as a tar, atomically (fsio.atomic_path).

    A crash leaves at most a hidden temporary (deleted by the next run), never a partial *.tar.
    Returns the sample count."""
    n = 0
    with atomic_path(path, what="shard") as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                key = sample["__key__"]
                for member in sorted(k for k in sample if not k.startswith("__")):
                    data = sample[member]
                    info = tarfile.TarInfo(f"{key}.{member}")
                    info.size, info.mode, info.mtime = len(data), 0o644, 0
                    tar.addfile(info, io.BytesIO(data))
                n += 1
    return n


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_fingerprint(path: str | Path) -> dict:
    """{"bytes", "sha256"} of a written shard, for its record."""
    return {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}


def sample_sha256(sample: dict) -> str:
    """sha256 of one sample's members ({"__key__", member: bytes}; "__" entries are not hashed):
    each member's name, length and bytes in name order, so moved or renamed bytes also differ."""
    digest = hashlib.sha256()
    for member in sorted(k for k in sample if not k.startswith("__")):
        data = sample[member]
        digest.update(member.encode() + b"\0" + len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def write_record(tar: str | Path, samples: list[dict], **fields) -> dict:
    """Write shard-k.json beside shard-k.tar (written from `samples`): its sample count, size,
    sha256 and each sample's sha256 by key (+ fields)."""
    record = {"samples": len(samples), **shard_fingerprint(tar),
              "sample_sha256": {s["__key__"]: sample_sha256(s) for s in samples}, **fields}
    write_text_atomic(Path(tar).with_suffix(RECORD_SUFFIX), json.dumps(record, indent=1, sort_keys=True))
    return record


def shard_record(url: str) -> dict | None:
    """The preprocess record beside a local shard (shard-k.json), or None."""
    if "://" in url:
        return None
    record = Path(url).with_suffix(RECORD_SUFFIX)
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and "samples" in data else None


def shard_problem(url: str, record: dict | None, verify: str = "checksum") -> str | None:
    """Why a local shard does not match its record (None: it matches, or there is no record)."""
    if record is None or verify == "none" or "bytes" not in record:
        return None
    try:
        size = os.path.getsize(url)
    except OSError:
        return "missing"
    if size != record["bytes"]:
        return f"{size} bytes, the record says {record['bytes']} (truncated or padded)"
    if verify == "checksum" and record.get("sha256") and file_sha256(url) != record["sha256"]:
        return "checksum differs from the record (the file was changed or damaged)"
    return None


def verify_shards(urls: Iterable[str], verify: str = "size") -> None:
    """Raise DataError for the first local shard that does not match its preprocess record."""
    if verify not in VERIFY_MODES:
        raise DataError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    for url in urls:
        problem = shard_problem(url, shard_record(url), verify)
        if problem:
            raise DataError(f"shard {url}: {problem}; delete it and re-run preprocess (finished shards "
                            f"are kept)")


def shard_urls(source: str | Path | list) -> list[str]:
    """Shard paths from: a directory (its *.tar, sorted, not recursive), a preprocess manifest.json,
    one .tar, a brace pattern ("shards/part-{000..009}.tar"), or a list of any of these."""
    if isinstance(source, (list, tuple)):
        return [u for s in source for u in shard_urls(s)]
    source = str(source)
    path = Path(source)
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob(f"*{SHARD_SUFFIX}"))
        lost = sorted(str(r.with_suffix(SHARD_SUFFIX)) for r in path.glob(f"*{RECORD_SUFFIX}")
                      if not r.with_suffix(SHARD_SUFFIX).exists() and shard_record(str(r.with_suffix(SHARD_SUFFIX))))
        if lost:
            raise DataError(f"shard {lost[0]}: missing, but its record {Path(lost[0]).with_suffix(RECORD_SUFFIX).name} "
                            f"is there; re-run preprocess to write it again (finished shards are kept)")
        if not urls:
            raise DataError(f"{source}: no *{SHARD_SUFFIX} shards in this directory; run forcelab preprocess first")
        return urls
    if path.suffix == ".json" and path.is_file():
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            listed = manifest["shards"]
            urls = [str(path.parent / Path(s["name"]).name) for s in listed if s["samples"] > 0]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise DataError(f"{source}: not a preprocess manifest ({type(e).__name__}: {e})") from None
        if not urls:
            raise DataError(f"{source}: no samples - the manifest lists {len(listed)} shard(s), all empty "
                            f"(see its 'skipped' list for why each input was skipped)")
        return urls
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
        check_tar_end(item["url"])
        yield item


def check_tar_end(url: str, fix: str = "re-run preprocess (finished shards are kept)") -> None:
    """Raise a DataError unless a local tar ends with the end-of-archive blocks (see check_complete)."""
    if "://" not in url and os.path.isfile(url):
        size = os.path.getsize(url)
        with open(url, "rb") as f:
            f.seek(max(size - 1024, 0))
            tail = f.read()
        if size % 512 or size < 1024 or tail.count(0) != len(tail):
            raise DataError(f"shard {url}: truncated ({size} bytes, no end-of-archive marker); delete it and {fix}")


def _check_count(url: str | None, n: int, expected: int | None) -> None:
    if url is not None and expected is not None and n != expected:
        raise DataError(f"shard {url}: {n} samples, its record says {expected}; the shard is damaged - "
                        f"delete it and re-run preprocess (finished shards are kept)")


def sample_problem(raw: dict, digests: dict | None) -> str | None:
    """Why a raw sample does not match its shard's record (None: it matches, or nothing is recorded)."""
    if not isinstance(digests, dict):
        return None
    expected = digests.get(raw.get("__key__"))
    if expected is None:
        return "not in the shard's record (the shard was changed after preprocess wrote it)"
    if sample_sha256(raw) != expected:
        return "checksum differs from the shard's record (a stored byte changed)"
    return None


def skip_damaged(raw: dict, message: str, log: list[dict]) -> None:
    """on_damage="skip": leave a damaged sample out, with one line on stderr and an entry in log."""
    log.append({"shard": raw.get("__url__"), "key": raw.get("__key__"), "problem": message})
    print(f"forcelab: skipped damaged sample: {message}", file=sys.stderr, flush=True)


def check_samples(on_damage: str = "stop", counts: bool = True, log: list[dict] | None = None):
    """Pipeline stage after the tar reader: each sample of a shard with a preprocess record
    matches its recorded sha256 (hashed from the bytes already in memory; a mismatch stops the
    stream or, with on_damage="skip", is skipped into `log`) and, unless `counts` is off
    (resampling may draw a shard twice in a row), the shard yields exactly the recorded number
    of samples (a shard cut at a member boundary reads as a shorter one)."""
    log = [] if log is None else log

    def stage(src):
        url, n, expected, digests = None, 0, None, None
        for sample in src:
            u = sample.get("__url__")
            if u != url:
                if counts:
                    _check_count(url, n, expected)
                record = (shard_record(u) if u else None) or {}
                url, n, expected, digests = u, 0, record.get("samples"), record.get("sample_sha256")
            n += 1
            problem = sample_problem(sample, digests)
            if problem is None:
                yield sample
                continue
            message = f"shard {url}, sample {sample.get('__key__')}: {problem}"
            if on_damage != "skip":
                raise DataError(f"{message}; delete the shard and re-run preprocess (finished shards are kept), "
                                f"or read with on_damage='skip' (training: data.on_damage=skip) to leave damaged samples out")
            skip_damaged(sample, message, log)
        if counts:
            _check_count(url, n, expected)
    return stage


def decode_samples(decode: Callable[[dict], dict], on_damage: str = "stop", log: list[dict] | None = None):
    """Pipeline stage: decode each raw sample; one that does not decode (a DataError naming its
    shard and key) stops the stream or, with on_damage="skip", is skipped into `log`."""
    log = [] if log is None else log

    def stage(src):
        for raw in src:
            try:
                yield decode(raw)
            except DataError as e:
                if on_damage != "skip":
                    raise
                skip_damaged(raw, str(e), log)
    return stage


class ShardDataset(IterableDataset):
    """Schema samples from webdataset shards (see the module docstring).

    decode: raw tar members -> sample (default: schema.decode_sample requiring `require`).
    split_by_node: False reads every shard on every rank (evaluation on one process).
    verify: "size" (default) or "checksum" checks every shard against its preprocess record
    when the dataset opens; "none" skips that. Each sample's checksum and each shard's sample
    count are checked while reading, whatever `verify` says.
    on_damage: "stop" (default) raises a DataError naming the shard and the sample key of a
    sample whose bytes differ from the record or that does not decode; "skip" leaves it out,
    prints one line naming it, and lists it in `damaged` (this process's reads only: with
    DataLoader workers the stderr lines are the record).
    """

    def __init__(self, source, *, shuffle: int = 1000, seed: int = 0, resampled: bool = False,
                 samples_per_epoch: int | None = None, split_by_node: bool = True,
                 require: tuple[str, ...] = ("latent",), dtype: torch.dtype = torch.float32,
                 decode: Callable[[dict], dict] | None = None, verify: str = "size", on_damage: str = "stop"):
        if on_damage not in ON_DAMAGE:
            raise DataError(f"on_damage must be one of {ON_DAMAGE}, got {on_damage!r}")
        self.urls = shard_urls(source)
        verify_shards(self.urls, verify)
        self.on_damage, self.damaged = on_damage, []
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
            seed = stream_seed(self.seed, "shard_order", self.epoch)
            stages = [wds.ResampledShards(self.urls, seed=seed, deterministic=True)]
        else:
            urls = list(self.urls)
            if self.shuffle:
                random.Random(stream_seed(self.seed, "shard_order", self.epoch)).shuffle(urls)
            stages = [wds.SimpleShardList(urls)]
            if self.split_by_node:
                stages.append(wds.split_by_node)
            stages.append(wds.split_by_worker)
        stages += [check_complete, wds.tarfile_to_samples(handler=_raise_shard_error),
                   check_samples(self.on_damage, counts=not self.resampled, log=self.damaged)]
        if self.shuffle:
            stages.append(wds.shuffle(self.shuffle, initial=min(self.shuffle, 100),
                                      seed=stream_seed(self.seed, "sample_shuffle", self.epoch, rank, worker)))
        stages.append(decode_samples(self.decode, self.on_damage, log=self.damaged))
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
