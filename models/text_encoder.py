"""Text encoders behind one small protocol: the toy encoder and umT5 (Wan2.1's encoder).

    te = load_text_encoder("toy")                  # or a local transformers directory
    emb, lengths = te.encode(["a red ball"])       # [B, L, D] float, [B] long

L = te.max_length always. Tokens at and past each prompt's true length are exactly zero
(Wan trims the encoder output to the real token count and zero-pads back to text_len), so
an embedding can be stored trimmed to [length, D] and padded again without loss.
Embeddings are cached per prompt (a small LRU) because recipes re-encode the same prompts.
"""

from __future__ import annotations

import re
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from ..dtypes import parse_dtype
from ..errors import ForcelabError
from .checkpoint import require_safetensors

# Every word the toy world's caption grammar can produce (data/toyworld.py); other words are
# hashed into TOY_HASH_ROWS extra rows, so any prompt encodes.
TOY_VOCAB = ("a an and one two three ball balls red green blue yellow magenta cyan orange "
             "white purple pink moving bouncing slowly quickly fast slow").split()
TOY_HASH_ROWS = 64
TOY_DIM, TOY_MAX_LENGTH = 32, 16      # the toy encoder's width and tokens (the toy DiT's text_dim, text_len)


@runtime_checkable
class TextEncoder(Protocol):
    name: str           # identifier recorded in shard meta ("toy-text-d32-l16", "umt5:<dir>")
    dim: int            # D
    max_length: int     # L: every output is padded (with zeros) to this many tokens

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


class _PromptCache:
    """LRU of trimmed embeddings [length, D] by prompt (trimmed: a 512-token umT5 pad is mostly zeros)."""

    def __init__(self, size: int):
        self.size = size
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, prompt: str) -> torch.Tensor | None:
        emb = self.items.get(prompt)
        if emb is not None:
            self.items.move_to_end(prompt)
        return emb

    def put(self, prompt: str, emb: torch.Tensor) -> None:
        if self.size <= 0:
            return
        self.items[prompt] = emb
        self.items.move_to_end(prompt)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


def pad_embeddings(trimmed: list[torch.Tensor], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[length_i, D] tensors -> ([B, max_length, D] zero-padded, lengths [B])."""
    dim = trimmed[0].shape[-1]
    out = trimmed[0].new_zeros(len(trimmed), max_length, dim)
    lengths = torch.zeros(len(trimmed), dtype=torch.long)
    for i, e in enumerate(trimmed):
        n = min(e.shape[0], max_length)
        out[i, :n] = e[:n]
        lengths[i] = n
    return out, lengths


class _CachedEncoder:
    """Shared encode(): look prompts up in the cache, encode the misses in one batch."""

    name: str
    dim: int
    max_length: int

    def _encode_trimmed(self, prompts: list[str]) -> list[torch.Tensor]:
        raise NotImplementedError

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ForcelabError(f"{self.name}: encode() needs at least one prompt")
        found = {p: self.cache.get(p) for p in prompts}
        missing = list(dict.fromkeys(p for p, e in found.items() if e is None))
        if missing:
            for p, e in zip(missing, self._encode_trimmed(missing)):
                found[p] = e
                self.cache.put(p, e)
        return pad_embeddings([found[p] for p in prompts], self.max_length)


def toy_words(prompt: str) -> list[str]:
    """The toy tokenizer: lower-case alphanumeric words."""
    return re.findall(r"[a-z0-9]+", prompt.lower())


class ToyTextEncoder(_CachedEncoder):
    """A fixed random embedding per word plus a position term, no training needed.

    Rows: one per TOY_VOCAB word, then TOY_HASH_ROWS rows shared by unknown words (chosen by
    crc32, stable across processes unlike hash()). Token i of a prompt is
    word[token] + 0.5 * position[i]; both tables come from a seeded generator, so the
    encoder is the same in every process and run. One token per word, no end token.
    """

    def __init__(self, dim: int = TOY_DIM, max_length: int = TOY_MAX_LENGTH, seed: int = 0, cache_size: int = 4096, device=None):
        self.dim, self.max_length, self.seed = dim, max_length, seed
        self.name = f"toy-text-d{dim}-l{max_length}-s{seed}"
        g = torch.Generator().manual_seed(seed)
        self.words = torch.randn(len(TOY_VOCAB) + TOY_HASH_ROWS, dim, generator=g)
        self.positions = 0.5 * torch.randn(max_length, dim, generator=g)
        if device is not None:
            self.words, self.positions = self.words.to(device), self.positions.to(device)
        self.index = {w: i for i, w in enumerate(TOY_VOCAB)}
        self.cache = _PromptCache(cache_size)

    def token_ids(self, prompt: str) -> list[int]:
        ids = []
        for w in toy_words(prompt)[: self.max_length]:
            i = self.index.get(w)
            ids.append(i if i is not None else len(TOY_VOCAB) + zlib.crc32(w.encode()) % TOY_HASH_ROWS)
        return ids

    def _encode_trimmed(self, prompts: list[str]) -> list[torch.Tensor]:
        out = []
        for p in prompts:
            ids = self.token_ids(p)
            out.append(self.words[ids] + self.positions[: len(ids)])
        return out


class UMT5TextEncoder(_CachedEncoder):
    """umT5 encoder (transformers UMT5EncoderModel + its tokenizer) from a local directory.

    Wan2.1 pads to 512 tokens with the end token counted in the length; outputs past the length
    are zeroed (the attention mask already hides padding inside the encoder).
    """

    def __init__(self, model, tokenizer, name: str = "umt5", max_length: int = 512, cache_size: int = 256):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.dim = int(model.config.d_model)
        self.max_length = max_length
        self.cache = _PromptCache(cache_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _encode_trimmed(self, prompts: list[str]) -> list[torch.Tensor]:
        # Padding to the batch's longest prompt instead of max_length gives the same outputs for the
        # real tokens (padding is masked out) at a fraction of the cost; pad_embeddings pads to L.
        tok = self.tokenizer(prompts, padding="longest", max_length=self.max_length, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        lengths = mask.sum(1).tolist()
        return [hidden[i, :n].clone() for i, n in enumerate(lengths)]


def load_text_encoder(spec: str, dtype=None, device=None, max_length: int | None = None) -> TextEncoder:
    """"toy" -> ToyTextEncoder(32, 16) ("toy:DIM" or "toy:DIM:LENGTH" for other sizes, e.g.
    "toy:4096" for umT5's width in benchmarks of Wan-sized models); a local directory ->
    UMT5TextEncoder.

    The directory holds a transformers UMT5EncoderModel (config.json + weights) and its tokenizer,
    either together or as a pipeline folder with text_encoder/ and tokenizer/ subfolders
    (the Wan2.1 diffusers layout). dtype: torch dtype or "bf16"/"fp16"/"fp32" (default fp32).
    """

    spec = str(spec)
    if spec == "toy" or spec.startswith("toy:"):
        try:
            sizes = [int(v) for v in spec.split(":")[1:]]
            if len(sizes) > 2 or min(sizes, default=1) < 1:
                raise ValueError(spec)
        except ValueError:
            raise ForcelabError(f"text encoder {spec!r}: write toy, toy:DIM or toy:DIM:LENGTH "
                                f"(positive integers)") from None
        dim = sizes[0] if sizes else TOY_DIM
        length = sizes[1] if len(sizes) > 1 else TOY_MAX_LENGTH
        return ToyTextEncoder(dim, max_length=max_length or length, device=device)
    root = Path(spec).expanduser()
    model_dir = root / "text_encoder" if (root / "text_encoder" / "config.json").is_file() else root
    tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else model_dir
    if not (model_dir / "config.json").is_file():
        raise ForcelabError(
            f"text encoder {spec}: not found - expected 'toy' or a local directory holding a transformers "
            f"UMT5EncoderModel (config.json + model.safetensors) and its tokenizer files, or a Wan2.1 "
            f"diffusers folder with text_encoder/ and tokenizer/")
    from transformers import AutoTokenizer, UMT5EncoderModel

    require_safetensors(model_dir, "text encoder")
    try:
        model = UMT5EncoderModel.from_pretrained(str(model_dir), dtype=parse_dtype(dtype) or torch.float32,
                                                 use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except (OSError, ValueError, KeyError) as e:
        raise ForcelabError(f"text encoder {model_dir}: cannot load UMT5EncoderModel + tokenizer ({e})") from None
    if device is not None:
        model = model.to(device)
    return UMT5TextEncoder(model, tokenizer, name=f"umt5:{root.name}", max_length=max_length or 512)


def save_tiny_umt5(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny random UMT5 encoder (d_model 32) and a small Unigram tokenizer in the T5
    format, built offline, for tests and smoke runs. Loads with load_text_encoder(path)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + w, -1.0) for w in TOY_VOCAB + ["the", "a", "of", "in", "on"]]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"]
    pieces = list(dict((p, s) for p, s in pieces).items())
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                    extra_ids=0).save_pretrained(str(path))
    config = UMT5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=32, relative_attention_max_distance=128,
                        feed_forward_proj="gated-gelu", dropout_rate=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        UMT5EncoderModel(config).save_pretrained(str(path))
    return Path(path)
