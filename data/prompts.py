"""Prompts for data-free recipes (DMD, Self-Forcing): text, or precomputed text embeddings.

    ds = PromptDataset("prompts.txt", text_encoder=te)   # encoded on first use (te caches)
    ds = PromptDataset("data/prompt_shards")             # `forcelab preprocess --prompts` output
    ds = PromptDataset.from_toyworld(n=256)               # toy world captions
    loader = DataLoader(ds, batch_size=8, shuffle=True, collate_fn=schema.collate)

A map-style dataset (prompt sets are small), so samplers and accelerate shard it by rank.
Items follow the sample schema without "latent": caption and meta, plus text_emb [L, D] and
text_len when embeddings are available (from shards or the text encoder).
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from ..models.text_encoder import load_text_encoder
from .inputs import empty_prompt, list_prompts
from .schema import DataError
from .shards import ShardDataset
from .toyworld import ToyWorld


def read_prompt_list(path: str | Path) -> list[str]:
    """Prompts from a .txt (one per line) or a CSV/JSONL with a caption or prompt column.

    Empty rows are passed over; a row that is not one text (a list, a NUL byte) is a DataError
    naming it - a training prompt set does not lose rows without a word."""
    items = list_prompts(str(path))
    bad = next((it for it in items if it.problem and it.problem != empty_prompt(it.source)), None)
    if bad is not None:
        raise DataError(f"prompts {path}: {bad.problem}")
    return [it.caption for it in items if it.caption]


class PromptDataset(Dataset):
    """source: a list of prompts, a prompt file (.txt/.csv/.jsonl), or prompt shards (a folder
    with *.tar, a manifest.json, a .tar). text_encoder: encodes text prompts on access (else
    items carry only the caption); ignored for shards, which hold embeddings already."""

    def __init__(self, source, text_encoder=None):
        self.text_encoder = text_encoder
        self.samples: list[dict] | None = None
        if isinstance(source, (list, tuple)):
            self.prompts = [str(p) for p in source]
        else:
            path = Path(source)
            if path.is_dir() or path.suffix in (".tar", ".json"):
                shards = ShardDataset(path, shuffle=0, split_by_node=False, require=())
                self.samples = sorted(shards, key=lambda s: s["key"])
                self.prompts = [s["caption"] for s in self.samples]
            else:
                self.prompts = read_prompt_list(path)
        if not self.prompts:
            raise DataError(f"prompts {source}: empty")

    @classmethod
    def from_toyworld(cls, n: int, world=None, first_index: int = 0, text_encoder="toy") -> "PromptDataset":
        """Captions of toy world scenes first_index .. first_index + n - 1."""
        world = world or ToyWorld()
        te = load_text_encoder(text_encoder) if isinstance(text_encoder, str) else text_encoder
        return cls([world.scene(first_index + i).caption for i in range(n)], text_encoder=te)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        if self.samples is not None:
            return self.samples[i]
        caption = self.prompts[i]
        item = {"caption": caption, "meta": {"caption": caption, "source": f"prompt:{i}"}, "key": f"{i:09d}"}
        if self.text_encoder is not None:
            emb, lengths = self.text_encoder.encode([caption])
            item |= {"text_emb": emb[0], "text_len": int(lengths[0])}
            item["meta"]["text_encoder"] = self.text_encoder.name
        return item
