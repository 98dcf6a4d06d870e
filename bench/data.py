"""Data throughput: the latent shard dataset (0 and 2 DataLoader workers) and the toy world.

    python bench/data.py                                   # toy-sized latents [6, 16, 8, 8]
    python bench/data.py --latent-shape 16,21,60,104       # Wan 480x832x81 latents (4.2 MB bf16 each)

Writes --samples synthetic samples as bf16 shards in a temporary folder, then times full
passes (decode + validate + shuffle + collate into batches; DataLoader worker start-up included)
and reports samples per second, plus the toy world generator (render + codec + text encoder).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from forcelab.data.schema import encode_sample
from forcelab.data.shards import ShardDataset, shard_loader, write_shard
from forcelab.data.toyworld import ToyWorld


def write_shards(folder: Path, samples: int, shard_size: int, shape: tuple[int, ...]) -> float:
    """Synthetic shards; returns MB written."""
    g = torch.Generator().manual_seed(0)
    text = torch.zeros(16, 32)
    text[:8] = torch.randn(8, 32, generator=g)
    latent = torch.randn(*shape, generator=g)
    for k in range(0, samples, shard_size):
        write_shard(folder / f"shard-{k // shard_size:06d}.tar",
                    [encode_sample(f"{i:09d}", latent=latent, text_emb=text, text_len=8,
                                   meta={"caption": "a red ball", "source": "bench"})
                     for i in range(k, min(k + shard_size, samples))])
    return sum(p.stat().st_size for p in folder.glob("*.tar")) / 2**20


def time_loader(folder: Path, workers: int, batch_size: int, passes: int) -> float:
    ds = ShardDataset(folder, shuffle=256)
    best = 0.0
    for epoch in range(passes):
        ds.set_epoch(epoch)
        t0, n = time.perf_counter(), 0
        for batch in shard_loader(ds, batch_size=batch_size, num_workers=workers):
            n += batch["latent"].shape[0]
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1024, help="samples written and read per pass")
    p.add_argument("--shard-size", type=int, default=128, help="samples per shard")
    p.add_argument("--latent-shape", default="6,16,8,8", help="C,F,H,W of each latent")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--passes", type=int, default=2, help="passes per setting; the best is reported")
    p.add_argument("--toy-samples", type=int, default=200, help="toy world samples generated")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the main process (data loading "
                                                          "runs single-threaded; more threads only contend)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.latent_shape.split(","))

    with tempfile.TemporaryDirectory() as tmp:
        mb = write_shards(Path(tmp), args.samples, args.shard_size, shape)
        print(f"latent shards: {args.samples} samples of {list(shape)} bf16 in "
              f"{-(-args.samples // args.shard_size)} shards ({mb:.1f} MB), batch {args.batch_size}")
        for workers in (0, 2):
            rate = time_loader(Path(tmp), workers, args.batch_size, args.passes)
            print(f"  {workers} workers: {rate:8.1f} samples/s  ({rate * mb / args.samples:.1f} MB/s)")

    world = ToyWorld()
    world.sample(0)  # builds the encoders' tables once
    from forcelab.models.autoencoder import load_autoencoder
    from forcelab.models.text_encoder import ToyTextEncoder

    codec, text = load_autoencoder("toy"), ToyTextEncoder()
    t0 = time.perf_counter()
    for i in range(args.toy_samples):
        world.sample(i, codec, text)
    rate = args.toy_samples / (time.perf_counter() - t0)
    c = world.config
    print(f"toy world: {rate:8.1f} samples/s  ({c.frames} frames of {c.height}x{c.width}, "
          f"render + codec + text, 1 process)")
    t0 = time.perf_counter()
    clip = world.clip(0, frames=4096)
    print(f"toy world long rollout: {len(clip.video) / (time.perf_counter() - t0):8.0f} frames/s "
          f"(ground truth for {len(clip.video)} frames)")


if __name__ == "__main__":
    main()
