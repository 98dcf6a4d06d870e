"""The sample schema shared by latent shards, prompt shards, ODE pairs and the toy world.

One sample (a dict):
    latent     float [C, F, H, W]   normalised video latent (absent in prompt-only samples)
    text_emb   float [L, D]         text embedding, exactly zero at and past text_len
    text_len   int                  true token count of the caption
    caption    str
    meta       dict                 shape, dtype, fps, frames, caption, source, encoder names...
  optional:
    ode_latents    float [S, C, F, H, W]  a teacher trajectory at S chosen steps (noise first, x0 last)
    ode_timesteps  float [S]              their timesteps (sigma * 1000)
    state          dict of tensors        toy world ground truth (positions, velocities, ...)

A batch (collate): latent [B, C, F, H, W], text_emb [B, L, D] (zero-padded to the longest L),
text_len [B] long, caption list[str], meta list[dict]; other tensors are stacked when their
shapes agree, everything else becomes a list.

On disk (one webdataset tar member per entry, all under the sample's key, no pickle):
    <key>.latent.safetensors   {"latent": [C, F, H, W]} in bf16 or fp16
    <key>.text.safetensors     {"text_emb": [text_len, D]} trimmed (padding is zeros by definition)
    <key>.ode.safetensors      {"latents": [S, C, F, H, W], "timesteps": [S]} (ODE pairs only)
    <key>.json                 meta, with at least SCHEMA_VERSION, text_len, text_max_length
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..dtypes import DTYPES
from ..errors import ForcelabError

SCHEMA_VERSION = 1
LATENT_MEMBER, TEXT_MEMBER, ODE_MEMBER = "latent.safetensors", "text.safetensors", "ode.safetensors"
META_MEMBER = "json"
STORAGE_DTYPES = DTYPES  # the names recorded in meta


class DataError(ForcelabError):
    """A data file (shard, manifest, sample) that does not fit the schema."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode_sample(key: str, *, text_emb: torch.Tensor, text_len: int, meta: dict,
                  latent: torch.Tensor | None = None, ode_latents: torch.Tensor | None = None,
                  ode_timesteps: torch.Tensor | None = None, dtype: str = "bf16") -> dict[str, bytes]:
    """One sample -> {member name: bytes} for a shard. text_emb may be padded ([L, D]) or trimmed."""
    if "." in key:
        raise ValueError(f"sample key {key!r} must not contain '.' (webdataset splits names at the first dot)")
    store = STORAGE_DTYPES[dtype]
    meta = dict(meta, schema=SCHEMA_VERSION, text_len=int(text_len),
                text_max_length=int(meta.get("text_max_length", text_emb.shape[0])), text_dim=int(text_emb.shape[-1]))
    out = {"__key__": key}
    if latent is not None:
        meta.update(shape=list(latent.shape), dtype=dtype_name(store))
        out[LATENT_MEMBER] = st_save({"latent": latent.detach().to("cpu", store).contiguous()})
    if ode_latents is not None:
        out[ODE_MEMBER] = st_save({"latents": ode_latents.detach().to("cpu", store).contiguous(),
                                   "timesteps": ode_timesteps.detach().to("cpu", torch.float32).contiguous()})
    out[TEXT_MEMBER] = st_save({"text_emb": text_emb[:text_len].detach().to("cpu", store).contiguous()})
    out[META_MEMBER] = json.dumps(meta, sort_keys=True).encode()
    return out


def _where(raw: dict) -> str:
    return f"shard {raw.get('__url__', '?')}, sample {raw.get('__key__', '?')}"


def _load_tensors(raw: dict, member: str, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    try:
        tensors = st_load(raw[member])
    except (SafetensorError, ValueError, TypeError) as e:
        raise DataError(f"{_where(raw)}: key '{member}' is not valid safetensors ({e}); the shard is "
                        f"corrupt - delete it and re-run preprocess") from None
    missing = [n for n in names if n not in tensors]
    if missing:
        raise DataError(f"{_where(raw)}: key '{member}' lacks tensor(s) {missing} (has {sorted(tensors)})")
    for n in names:
        if tensors[n].is_floating_point() and not bool(torch.isfinite(tensors[n]).all()):
            raise DataError(f"{_where(raw)}: key '{member}' tensor '{n}' holds NaN or inf values; the sample "
                            f"is damaged - re-run preprocess for its input, or skip damaged samples")
    return tensors


def decode_sample(raw: dict, require: tuple[str, ...] = ("latent",), dtype: torch.dtype = torch.float32) -> dict:
    """Raw tar members {"__key__", "__url__", "json", ...} -> a schema sample, validated
    (shapes agree with meta, every stored tensor is finite).

    require: which optional parts must be present ("latent", "ode"); text and meta always are.
    Raises DataError naming the shard, the sample key and the member."""
    members = {"latent": LATENT_MEMBER, "ode": ODE_MEMBER}
    needed = [META_MEMBER, TEXT_MEMBER] + [members[r] for r in require]
    missing = [m for m in needed if m not in raw]
    if missing:
        present = sorted(k for k in raw if not k.startswith("__"))
        raise DataError(f"{_where(raw)}: missing key(s) {missing} (has {present}); the shard is truncated "
                        f"or was not written by forcelab preprocess")
    try:
        meta = json.loads(raw[META_MEMBER])
        text_len, max_len = int(meta["text_len"]), int(meta["text_max_length"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{_where(raw)}: key 'json' is not valid meta ({type(e).__name__}: {e})") from None
    if meta.get("schema") != SCHEMA_VERSION:
        raise DataError(f"{_where(raw)}: schema version {meta.get('schema')!r}, this forcelab reads "
                        f"{SCHEMA_VERSION}; re-run preprocess")
    text = _load_tensors(raw, TEXT_MEMBER, ("text_emb",))["text_emb"]
    if text.ndim != 2 or text.shape[0] != text_len or text_len > max_len:
        raise DataError(f"{_where(raw)}: key '{TEXT_MEMBER}' has shape {list(text.shape)} but meta says "
                        f"text_len {text_len} of at most {max_len}")
    text_emb = text.new_zeros(max_len, text.shape[1], dtype=dtype)
    text_emb[:text_len] = text
    sample: dict[str, Any] = {"text_emb": text_emb, "text_len": text_len,
                              "caption": meta.get("caption", ""), "meta": meta, "key": raw.get("__key__")}
    if LATENT_MEMBER in raw:
        latent = _load_tensors(raw, LATENT_MEMBER, ("latent",))["latent"]
        if latent.ndim != 4 or list(latent.shape) != list(meta.get("shape", latent.shape)):
            raise DataError(f"{_where(raw)}: key '{LATENT_MEMBER}' has shape {list(latent.shape)}, expected "
                            f"[C, F, H, W] = {meta.get('shape')}")
        sample["latent"] = latent.to(dtype)
    if ODE_MEMBER in raw:
        ode = _load_tensors(raw, ODE_MEMBER, ("latents", "timesteps"))
        if ode["latents"].ndim != 5 or ode["timesteps"].shape != ode["latents"].shape[:1]:
            raise DataError(f"{_where(raw)}: key '{ODE_MEMBER}' has latents {list(ode['latents'].shape)} and "
                            f"timesteps {list(ode['timesteps'].shape)}, expected [S, C, F, H, W] and [S]")
        sample["ode_latents"], sample["ode_timesteps"] = ode["latents"].to(dtype), ode["timesteps"]
    return sample


def collate(samples: list[dict]) -> dict:
    """Stack a list of schema samples into a batch (see the module docstring)."""
    if not samples:
        raise ValueError("collate: empty batch")
    batch: dict[str, Any] = {}
    if "text_emb" in samples[0]:
        length = max(s["text_emb"].shape[0] for s in samples)
        dim = samples[0]["text_emb"].shape[1]
        text = samples[0]["text_emb"].new_zeros(len(samples), length, dim)
        for i, s in enumerate(samples):
            if s["text_emb"].shape[1] != dim:
                raise DataError(f"collate: text width {s['text_emb'].shape[1]} vs {dim} in one batch "
                                f"(samples {s.get('key')} and {samples[0].get('key')}): mixed text encoders")
            text[i, : s["text_emb"].shape[0]] = s["text_emb"]
        batch["text_emb"] = text
        batch["text_len"] = torch.tensor([int(s["text_len"]) for s in samples], dtype=torch.long)
    for k in samples[0]:
        if k in batch:
            continue
        values = [s.get(k) for s in samples]
        if all(isinstance(v, torch.Tensor) for v in values):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) == 1:
                batch[k] = torch.stack(values)
                continue
            if k == "latent":
                raise DataError(f"collate: latents of different shapes {sorted(shapes)} in one batch; "
                                f"use one resolution bucket and frame count per data set (or batch size 1)")
        batch[k] = values
    return batch
