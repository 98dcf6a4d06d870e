"""Training data as streams of batches addressed by global sample position.

The trainer hands out positions: micro-batch n (counted over the whole run) of rank r holds
positions (n * world + r) * batch + j. A run with batch 4 on one process and one with batch 2
on two processes (or batch 2 with two accumulation steps) read the same samples per step, and
a resumed run continues at the same position - its only state is the micro-batch counter.

    toyworld              the toy world: sample = scene `position` (latents + caption + text)
    prompt file / list    captions in a seeded order, a new permutation per epoch
    shard folder          webdataset shards (latents, prompts or ODE pairs); streamed per rank,
                          so position addressing is approximate: a resume skips what was read
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.prompts import PromptDataset
from ..data.schema import collate
from ..data.shards import ShardDataset, shard_loader
from ..data.toyworld import ToyWorld, ToyWorldConfig
from ..errors import ConfigError, ForcelabError
from ..seeds import stream_seed

TOYWORLD = "toyworld"
PROMPT_SUFFIXES = (".txt", ".csv", ".jsonl")   # prompt files (forcelab.data.prompts reads them)


class ToyStream:
    """Toy world samples by position: latents from the codec, captions, text embeddings."""

    def __init__(self, codec, text_encoder, frames: int | None, height: int, width: int,
                 with_latents: bool = True, seed: int = 0, background_texture: float = 0.0):
        cfg = ToyWorldConfig(height=height, width=width, background_texture=background_texture,
                             **({"frames": frames} if frames else {}))
        self.world = ToyWorld(cfg, seed=seed)
        self.codec, self.text_encoder, self.with_latents = codec, text_encoder, with_latents

    def batch(self, positions: list[int]) -> dict:
        if self.with_latents:
            samples = [self.world.sample(p, self.codec, self.text_encoder) for p in positions]
            for s in samples:
                s.pop("state")
        else:
            captions = [self.world.scene(p).caption for p in positions]
            emb, lengths = self.text_encoder.encode(captions)
            samples = [{"caption": c, "text_emb": emb[i], "text_len": n, "key": str(p)}
                       for i, (c, p, n) in enumerate(zip(captions, positions, lengths.tolist()))]
        return collate(samples)

    def captions(self, n: int) -> list[str]:
        return [self.world.scene(i).caption for i in range(n)]


class MapStream:
    """A map-style dataset (e.g. PromptDataset) read in a seeded permutation per epoch."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def _index(self, position: int) -> int:
        n = len(self.dataset)
        epoch = position // n
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(stream_seed(self.seed, "epoch_order", epoch))
            self._perm = (epoch, torch.randperm(n, generator=g))
        return int(self._perm[1][position % n])

    def batch(self, positions: list[int]) -> dict:
        return collate([self.dataset[self._index(p)] for p in positions])

    def captions(self, n: int) -> list[str]:
        return [self.dataset[i]["caption"] for i in range(min(n, len(self.dataset)))]


class ShardStream:
    """Webdataset shards, each rank its own split (see data/shards.py); positions are counted,
    not addressed: a resume skips the samples this rank already read."""

    def __init__(self, source, require: tuple[str, ...], seed: int, shuffle: int, num_workers: int,
                 batch_size: int, on_damage: str = "stop"):
        self.dataset = ShardDataset(source, shuffle=shuffle, seed=seed, require=require, on_damage=on_damage)
        self.loader_args = dict(batch_size=batch_size, num_workers=num_workers, drop_last=True)
        self._make_loader = shard_loader
        self.epoch, self.read = 0, 0
        self._it = None

    def _next(self) -> dict:
        while True:
            if self._it is None:
                self.dataset.set_epoch(self.epoch)
                self._it = iter(self._make_loader(self.dataset, **self.loader_args))
            try:
                return next(self._it)
            except StopIteration:
                self._it, self.epoch = None, self.epoch + 1
            except ForcelabError as e:        # from a DataLoader worker: its one line, not the traceback
                raise type(e)(worker_message(str(e))) from None

    def batch(self, positions: list[int]) -> dict:
        b = self._next()
        self.read += 1
        return b

    def skip(self, batches: int) -> None:
        for _ in range(batches):
            self.batch([])

    def captions(self, n: int) -> list[str]:
        return []


def worker_message(text: str) -> str:
    """A DataLoader worker's error comes back as "Caught X in DataLoader worker ...", the
    worker's traceback and, last, "module.X: message": keep the message."""
    if "DataLoader worker" not in text or "Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    head, sep, message = last.partition(": ")
    return message if sep and "." in head and " " not in head else last


def make_stream(cfg, kind: str, codec, text_encoder):
    """The stream for a recipe's data kind from cfg.data.source."""
    source = cfg.data.source
    if source == TOYWORLD:
        if kind == "ode_pairs":
            raise ConfigError("data.source: ODE pairs come from shards (the ode_init recipe writes them), "
                              "not from the toy world directly")
        return ToyStream(codec, text_encoder, cfg.data.frames, cfg.data.height, cfg.data.width,
                         with_latents=kind == "latents", seed=cfg.seed,
                         background_texture=cfg.data.background_texture)
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(f"data.source: {source} not found; give 'toyworld', a shard folder "
                          f"(forcelab preprocess output) or a prompt file (.txt/.csv/.jsonl)")
    if kind == "prompts" and path.is_file() and path.suffix in PROMPT_SUFFIXES:
        return MapStream(PromptDataset(path, text_encoder=text_encoder), cfg.seed)
    require = {"latents": ("latent",), "ode_pairs": ("ode",), "prompts": ()}[kind]
    return ShardStream(path, require, cfg.seed, cfg.data.shuffle, cfg.data.num_workers, cfg.data.batch_size,
                       cfg.data.on_damage)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
