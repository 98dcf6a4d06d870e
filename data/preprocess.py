"""`forcelab preprocess`: encode videos + captions (or prompts) into webdataset shards.

    forcelab preprocess --videos DIR|manifest.csv|manifest.jsonl --out DIR --vae PATH|toy \
        --text-encoder PATH|toy [--size 480x832] [--frames 81] [--fps 16] [--batch-size 4]
    forcelab preprocess --prompts prompts.txt --out DIR --text-encoder PATH|toy   # prompt shards
    accelerate launch -m forcelab.data.preprocess ...                              # several ranks

Inputs: a folder of videos with a sidecar caption each (clip.mp4 + clip.txt), or a CSV/JSONL
manifest with `path,caption`; a prompt list (.txt one per line, or CSV/JSONL with a caption or
prompt column). A manifest is the user's own word: its paths may be absolute or lead outside
its folder; relative ones start from --root (default: the manifest's folder). What comes from
the data never names an output: sample keys are input indices, shards are shard-k.tar.

Shards: inputs in their listed order are cut into shards of --shard-size inputs; shard k is
written by rank k % world_size as shard-k.tar, atomically, followed by shard-k.json (what
went in, what was skipped and why, the sample count, size and sha256 of the tar). A rerun
with the same settings skips shards whose tar matches its record (a damaged one is redone),
so an interrupted run resumes without redoing or duplicating anything, even with a different
number of ranks. A rerun with other settings or inputs is refused, naming what changed.
Rank 0 then writes manifest.json (counts, shards, skipped inputs). A bad input (missing, a
dangling symlink, corrupt, too short, no caption, a caption that is a list or holds a NUL byte,
a caption file that is not UTF-8, a manifest row without a usable path) is skipped and
recorded, or stops the run with --strict; when no input at all was usable the run ends with
exit status 2 and one line (the manifest still lists every reason). Text files are UTF-8 (a
BOM is fine). Sample keys are the input's index in the list. --workers N decodes videos in
N processes per rank while the encoders run.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .. import __version__
from ..errors import ForcelabError
from ..fsio import check_kind, check_output_dir, clean_stale, mark, read_text, write_text_atomic, written_by_forcelab
from ..locks import lock_folder
from ..models.autoencoder import load_autoencoder
from ..models.text_encoder import load_text_encoder
from ..progress import progress_bar
from ..validate import (arg, fits_memory, in_range, non_negative_float, non_negative_int, parse_device,
                        positive_int)
from .inputs import Item, list_prompts, list_videos, root_alone
from .schema import STORAGE_DTYPES, encode_sample
from .shards import shard_problem, write_record, write_shard
from .video import DEFAULT_FPS, VideoError, check_fps, read_video

SETTINGS_FILE, MANIFEST_FILE, INPUTS_FILE = "preprocess.json", "manifest.json", "inputs.json"
PREPROCESS_KIND = "preprocess"   # what its output folder's marker records
DEFAULT_CLIP_FRAMES = 81         # frames per clip (Wan2.1's 5 s at 16 fps: 21 latent frames)
WORKERS_PER_CPU = 4  # decoding processes beyond this many per core only add memory and start-up time
DECODED_BYTES = 4 + 1  # per pixel value of a clip in flight: float32 for the encoder + the uint8 decode
_LISTED_CHANGES = 3  # inputs named in a refused resume's message, per kind of change


def parse_size(text: str) -> list[tuple[int, int]]:
    """"480x832" or "480x832,832x480" (resolution buckets) -> [(H, W), ...]."""
    try:
        sizes = [tuple(int(v) for v in part.lower().split("x")) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or min(s) <= 0 for s in sizes):
        raise ForcelabError(f"--size {text!r}: write HxW, e.g. 480x832, or several buckets 480x832,832x480")
    return sizes


# ---- encoding ----

class Encoder:
    """Turns items of one shard into encoded samples, batching videos of the same size."""

    def __init__(self, args, vae, text_encoder, device):
        self.args, self.vae, self.text, self.device = args, vae, text_encoder, device
        self.sizes = parse_size(args.size) if vae is not None else None

    def _meta(self, item: Item) -> dict:
        return {"source": item.source, "caption": item.caption, "text_encoder": self.text.name,
                "text_max_length": self.text.max_length}

    def _text(self, items: list[Item]):
        emb, lengths = self.text.encode([it.caption for it in items])
        return emb.float().cpu(), lengths.tolist()

    def prompts(self, items: list[Item], skipped: list[dict]) -> list[dict]:
        out = []
        for item in items:
            if item.problem or item.caption is None:
                reason = item.problem or f"{item.source}: no prompt text"
                if self.args.strict:
                    raise ForcelabError(f"{reason} (--strict: stopping; drop --strict to skip bad inputs)")
                skipped.append({"index": item.index, "source": item.source, "reason": reason})
        items = [it for it in items if not it.problem and it.caption is not None]
        for i in range(0, len(items), self.args.batch_size):
            batch = items[i:i + self.args.batch_size]
            emb, lengths = self._text(batch)
            out += [encode_sample(f"{it.index:09d}", text_emb=e, text_len=n, meta=self._meta(it),
                                  dtype=self.args.dtype) for it, e, n in zip(batch, emb, lengths)
                    if self._finite(it, {"text": e}, skipped)]
        return out

    def _finite(self, item: Item, outputs: dict[str, torch.Tensor], skipped: list[dict]) -> bool:
        """An encoding with NaN or inf values is not written: it is recorded (or stops with --strict)."""
        bad = [name for name, t in outputs.items() if not bool(torch.isfinite(t).all())]
        if not bad:
            return True
        reason = (f"{item.source}: the {' and '.join(bad)} encoder gave NaN or inf values; check this input "
                  f"and the encoders (--encoder-dtype fp32)")
        if self.args.strict:
            raise ForcelabError(f"{reason} (--strict: stopping; drop --strict to skip bad inputs)")
        skipped.append({"index": item.index, "source": item.source, "reason": reason})
        return False

    def videos(self, items: list[Item], skipped: list[dict], progress) -> list[dict]:
        clips = _Clips(items, self.args.fps, self.args.frames, self.sizes, self.args.start)
        loader = DataLoader(clips, batch_size=None, num_workers=self.args.workers, collate_fn=_identity)
        out, pending = [], {}  # pending: size -> [(item, video [3, F, H, W] in [-1, 1])]
        for i, video, error in loader:
            item = items[i]
            if error is not None:
                if self.args.strict:
                    raise ForcelabError(f"{error} (--strict: stopping; drop --strict to skip bad inputs)")
                skipped.append({"index": item.index, "source": item.source, "reason": error})
                progress.update(1)
                continue
            group = pending.setdefault(tuple(video.shape[-2:]), [])
            group.append((item, video.float().div_(127.5).sub_(1.0)))
            if len(group) == self.args.batch_size:
                out += self._encode_videos(pending.pop(tuple(video.shape[-2:])), skipped)
                progress.update(len(group))
        for group in pending.values():
            out += self._encode_videos(group, skipped)
            progress.update(len(group))
        return out

    def _encode_videos(self, group: list[tuple[Item, torch.Tensor]], skipped: list[dict]) -> list[dict]:
        items = [it for it, _ in group]
        latents = encode_batch(self.vae, torch.stack([v for _, v in group]).to(self.device)).float().cpu()
        emb, lengths = self._text(items)
        out = []
        for it, z, e, n in zip(items, latents, emb, lengths):
            if not self._finite(it, {"video": z, "text": e}, skipped):
                continue
            meta = self._meta(it) | {"vae": self.vae.name, "fps": self.args.fps, "frames": self.args.frames,
                                     "start": self.args.start, "size": list(group[0][1].shape[-2:])}
            out.append(encode_sample(f"{it.index:09d}", latent=z, text_emb=e, text_len=n, meta=meta,
                                     dtype=self.args.dtype))
        return out


class _Clips(Dataset):
    """Decodes input i -> (i, uint8 video [3, F, H, W] or None, error text or None); runs in
    DataLoader workers with --workers N so decoding overlaps encoding."""

    def __init__(self, items: list[Item], fps: float, frames: int, sizes, start: float):
        self.items, self.fps, self.frames, self.sizes, self.start = items, fps, frames, sizes, start

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        if item.problem:
            return i, None, item.problem
        if item.caption is None:
            return i, None, (f"{item.source}: no caption - add {Path(item.source).with_suffix('.txt').name} "
                             f"beside it or a caption in the manifest")
        try:
            video = read_video(item.source, fps=self.fps, frames=self.frames, size=self.sizes, start=self.start)
        except VideoError as e:
            return i, None, str(e)
        return i, video.permute(1, 0, 2, 3), None


def _identity(x):
    return x


def encode_batch(vae, videos: torch.Tensor) -> torch.Tensor:
    """[B, 3, F, H, W] in [-1, 1] -> latents (a seam for tests and for custom encoders)."""
    return vae.encode(videos)


# ---- the run ----

def _distributed(device_arg: str | None) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether we started the process group) from torchrun/accelerate env."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    started = False
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        started = True
    if device_arg:
        device = parse_device(device_arg)
    else:
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device, started


def _barrier(world: int) -> None:
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _lock_out(out: Path, rank: int, world: int):
    """Rank 0 holds --out for the whole run (so the ranks of one run never wait for each other,
    and a second run is refused); every rank learns its verdict."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = lock_folder(out, "--out")
        except ForcelabError as e:
            error = str(e)
    if world > 1 and torch.distributed.is_initialized():
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ForcelabError(error)
    return lock


def _write_json(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def _listing(items: list[Item]) -> list[list[str]]:
    """What identifies the inputs: [source, sha256 of the caption] per input, in order."""
    return [[it.source, hashlib.sha256(str(it.caption).encode()).hexdigest()[:16]] for it in items]


def _changed_inputs(old: list, new: list) -> str:
    """Which inputs were added, removed or re-captioned between two listings (a short list)."""
    before, after = {s: c for s, c in old}, {s: c for s, c in new}
    parts = []
    for label, names in (("added", [s for s in after if s not in before]),
                         ("removed", [s for s in before if s not in after]),
                         ("caption changed", [s for s in after if s in before and before[s] != after[s]])):
        if names:
            more = f" and {len(names) - _LISTED_CHANGES} more" if len(names) > _LISTED_CHANGES else ""
            parts.append(f"{label}: {', '.join(names[:_LISTED_CHANGES])}{more}")
    if not parts and [s for s, _ in old] != [s for s, _ in new]:
        parts.append("the same inputs in another order")
    return "; ".join(parts) or "the input list changed"


def _check_args(args) -> None:
    """One line for a bad combination or value of flags, before any work."""
    if bool(args.videos) == bool(args.prompts):
        raise ForcelabError("give exactly one of --videos (videos + captions) or --prompts (a prompt list)")
    if args.videos and not args.vae:
        raise ForcelabError("--videos needs --vae (a local Wan VAE directory, or toy)")
    for flag, value, check in (("--frames", args.frames, positive_int), ("--fps", args.fps, check_fps),
                               ("--start", args.start, non_negative_float),
                               ("--batch-size", args.batch_size, positive_int),
                               ("--shard-size", args.shard_size, positive_int),
                               ("--workers", args.workers, non_negative_int)):
        check(value, flag)  # argparse checks them too; this guards callers that build args themselves
    cpus = os.cpu_count() or 1
    in_range(args.workers, "--workers", 0, WORKERS_PER_CPU * cpus, integer=True,
             why=f"{WORKERS_PER_CPU} decoding processes per core, {cpus} cores here")
    if args.videos:
        parse_size(args.size)


def run(args) -> int:
    _check_args(args)
    out = check_output_dir(args.out, "--out")
    check_kind(out, PREPROCESS_KIND, "--out")
    if out.is_dir() and any(out.iterdir()) and not (written_by_forcelab(out) or (out / SETTINGS_FILE).is_file()):
        raise ForcelabError(f"--out {out}: holds other files and no preprocess run; forcelab does not write "
                            f"among them - choose a new or empty folder")
    root = getattr(args, "root", None)
    if args.prompts and root is not None:
        raise root_alone(root)
    items = list_videos(args.videos, root) if args.videos else list_prompts(args.prompts)
    out.mkdir(parents=True, exist_ok=True)
    if not written_by_forcelab(out):
        mark(out, PREPROCESS_KIND)
    clean_stale(out)  # temporaries of a killed earlier run
    rank, world, device, started = _distributed(args.device)
    lock = None
    try:
        lock = _lock_out(out, rank, world)
        text = load_text_encoder(args.text_encoder, dtype=args.encoder_dtype, device=device)
        vae = load_autoencoder(args.vae, dtype=args.encoder_dtype, device=device) if args.videos else None
        settings = {"mode": "videos" if vae else "prompts", "vae": vae.name if vae else None,
                    "text_encoder": text.name, "dtype": args.dtype, "shard_size": args.shard_size}
        if vae:
            settings |= {"frames": args.frames, "fps": args.fps, "size": args.size, "start": args.start}
            _check_clip(vae, args)
        listing = json.dumps([[it.source, it.caption] for it in items]).encode()
        settings["inputs_sha256"] = hashlib.sha256(listing).hexdigest()
        _check_settings(out / SETTINGS_FILE, settings, rank, _listing(items))

        shards = [items[i:i + args.shard_size] for i in range(0, len(items), args.shard_size)]
        mine = [k for k in range(len(shards)) if k % world == rank]
        done = [k for k in mine if _finished(out, k, settings)]
        progress = progress_bar(total=sum(len(shards[k]) for k in mine), initial=sum(len(shards[k]) for k in done),
                                unit="input", desc=f"preprocess (rank {rank}/{world})", disable=rank != 0 or args.quiet)
        encoder = Encoder(args, vae, text, device)
        with torch.inference_mode(), progress:
            for k in mine:
                if k in done:
                    continue
                skipped: list[dict] = []
                if vae:
                    samples = encoder.videos(shards[k], skipped, progress)
                else:
                    samples = encoder.prompts(shards[k], skipped)
                    progress.update(len(shards[k]))
                samples.sort(key=lambda s: s["__key__"])
                tar = out / f"shard-{k:06d}.tar"
                write_shard(tar, samples)
                write_record(tar, samples, settings_sha256=_digest(settings), rank=rank,
                             inputs=[it.index for it in shards[k]], skipped=skipped)
        _barrier(world)
        if rank == 0:
            manifest = _write_manifest(out, shards, settings, items)
            c = manifest["counts"]
            if manifest["complete"] and c["written"] == 0:
                first = manifest["skipped"][0]["reason"] if manifest["skipped"] else "no inputs"
                raise ForcelabError(f"nothing usable: all {c['inputs']} input(s) were skipped (first: {first}); "
                                    f"each reason is in {out / MANIFEST_FILE} under 'skipped'")
            print(f"preprocess: {c['written']} samples in {c['shards']} shards, {c['skipped']} skipped "
                  f"-> {out / MANIFEST_FILE}", file=sys.stderr)
            return 0 if manifest["complete"] else 1
        return 0
    finally:
        if lock is not None:
            lock.release()
        if started:
            torch.distributed.destroy_process_group()


def _check_clip(vae, args) -> None:
    t, s = vae.temporal_stride, vae.spatial_stride
    if (args.frames - 1) % t:
        raise ForcelabError(f"--frames {args.frames}: {vae.name} needs {t}k+1 frames, e.g. "
                            f"{t * ((args.frames - 1) // t) + 1}")
    for h, w in parse_size(args.size):
        if h % s or w % s:
            raise ForcelabError(f"--size {h}x{w}: {vae.name} needs multiples of {s}")
        clips = args.batch_size * (args.workers + 1)      # a batch being encoded + one decoded per worker
        fits_memory(DECODED_BYTES * clips * args.frames * 3 * h * w, torch.device("cpu"),
                    f"--size {h}x{w} x --frames {args.frames} x --batch-size {args.batch_size} "
                    f"({args.workers} workers)", "lower --size, --frames, --batch-size or --workers")


def _digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _check_settings(path: Path, settings: dict, rank: int, listing: list) -> None:
    """A folder holds one preprocess run: resuming with other settings would mix shards."""
    if path.is_file():
        try:
            old = json.loads(read_text(path, "--out"))
        except ValueError:
            raise ForcelabError(f"{path}: damaged (not JSON); use a new --out") from None
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            what = "; ".join(f"{k}: {a!r} before, {b!r} now" for k, (a, b) in diff.items() if k != "inputs_sha256")
            if "inputs_sha256" in diff:
                try:
                    changed = _changed_inputs(json.loads(read_text(path.parent / INPUTS_FILE, "--out")), listing)
                except (ForcelabError, ValueError, TypeError):
                    changed = "the input list changed"
                what = "; ".join(filter(None, [what, f"inputs changed ({changed})"]))
            raise ForcelabError(f"{path.parent}: holds a preprocess run with other settings ({what}); "
                                f"use a new --out, or the same inputs and options to resume")
    elif rank == 0:
        _write_json(path.parent / INPUTS_FILE, listing)
        _write_json(path, settings)


def _finished(out: Path, k: int, settings: dict, verify: str = "checksum") -> bool:
    """Shard k is written, by these settings, and its tar still matches the record (a damaged
    shard is redone - both files are this run's own outputs)."""
    tar, record = out / f"shard-{k:06d}.tar", out / f"shard-{k:06d}.json"
    if not tar.is_file() or not record.is_file():
        return False
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False
    if not isinstance(data, dict) or data.get("settings_sha256") != _digest(settings):
        return False
    problem = shard_problem(str(tar), data, verify) if "bytes" in data else "no size or checksum recorded"
    if problem:
        print(f"preprocess: {tar.name}: {problem}; writing it again", file=sys.stderr)
        return False
    return True


def _write_manifest(out: Path, shards: list[list[Item]], settings: dict, items: list[Item]) -> dict:
    entries, skipped, missing = [], [], []
    for k in range(len(shards)):
        if not _finished(out, k, settings, verify="size"):  # the shards were verified when the run began
            missing.append(f"shard-{k:06d}")
            continue
        record = json.loads((out / f"shard-{k:06d}.json").read_text())
        entries.append({"name": f"shard-{k:06d}.tar", "samples": record["samples"]})
        skipped += record["skipped"]
    manifest = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "forcelab": __version__, "settings": settings, "complete": not missing, "missing_shards": missing,
        "counts": {"inputs": len(items), "written": sum(e["samples"] for e in entries),
                   "skipped": len(skipped), "shards": len(entries)},
        "shards": entries, "skipped": skipped}
    _write_json(out / MANIFEST_FILE, manifest)
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("inputs (one of)")
    src.add_argument("--videos", help="folder of videos with sidecar .txt captions, or a CSV/JSONL manifest "
                                      "with path,caption")
    src.add_argument("--prompts", help="prompt list (.txt one per line, or CSV/JSONL with a caption column): "
                                       "prompt-only shards")
    parser.add_argument("--root", help="folder that relative paths in a --videos manifest start from "
                                       "(default: the manifest's folder)")
    parser.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    parser.add_argument("--vae", help="video autoencoder: a local Wan VAE (diffusers) directory, or toy")
    parser.add_argument("--text-encoder", required=True, help="text encoder: a local umT5 directory, or toy")
    parser.add_argument("--size", default="480x832", help="HxW, or comma-separated buckets (closest aspect wins)")
    parser.add_argument("--frames", type=arg(positive_int), default=DEFAULT_CLIP_FRAMES, help="frames per clip (4k+1 for the Wan VAE)")
    parser.add_argument("--fps", type=arg(check_fps), default=DEFAULT_FPS, help="frame rate the clip is sampled at")
    parser.add_argument("--start", type=arg(non_negative_float), default=0.0, help="clip start in seconds")
    parser.add_argument("--batch-size", type=arg(positive_int), default=4, help="videos (or prompts) encoded together")
    parser.add_argument("--shard-size", type=arg(positive_int), default=256, help="inputs per shard")
    parser.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), default="bf16", help="stored tensor dtype")
    parser.add_argument("--encoder-dtype", choices=sorted(STORAGE_DTYPES), default="fp32",
                        help="dtype the encoders run in")
    parser.add_argument("--workers", type=arg(non_negative_int), default=0,
                        help="video decoding processes per rank (0: decode "
                                                               "in the main process)")
    parser.add_argument("--device", help="device for the encoders (default: this rank's GPU, else cpu)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


if __name__ == "__main__":  # `accelerate launch -m forcelab.data.preprocess ...`: the subcommand per rank
    from forcelab.cli import main

    sys.exit(main(["preprocess", *sys.argv[1:]]))
