"""DiT weights on disk: original Wan2.1 and diffusers WanTransformer3DModel directories.

Both are a directory with config.json and safetensors weights (one file, or shards listed in
an index JSON). Our module names are the original Wan names; diffusers names are mapped by
`diffusers_to_wan` / `wan_to_diffusers`. Loading builds the model on the meta device and
materialises one tensor at a time straight in the target dtype and device (no full fp32 copy);
models/shard_loading.py reads only the rows a process holds of a sharded model.
forcelab-only settings (text_len, RoPE, causal defaults) ride along in config.json under the
key "forcelab"; both libraries ignore it.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError, ConfigError, ForcelabError
from ..fsio import atomic_directory, recover
from .config import DiTConfig

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
FORMATS = ("diffusers", "wan")
EXTRA_KEY = "forcelab"
DEFAULT_SHARD_BYTES = 5 * 2**30  # diffusers' default shard size
EXTRA_FIELDS = ("text_len", "rope_theta", "chunk_frames", "window_frames", "sink_frames", "sink_rope")

# (original Wan, diffusers) name fragments, applied in order
_BLOCK_RENAMES = [
    ("self_attn.o.", "attn1.to_out.0."), ("self_attn.q.", "attn1.to_q."), ("self_attn.k.", "attn1.to_k."),
    ("self_attn.v.", "attn1.to_v."), ("self_attn.norm_", "attn1.norm_"),
    ("cross_attn.o.", "attn2.to_out.0."), ("cross_attn.q.", "attn2.to_q."), ("cross_attn.k.", "attn2.to_k."),
    ("cross_attn.v.", "attn2.to_v."), ("cross_attn.norm_", "attn2.norm_"),
    ("ffn.0.", "ffn.net.0.proj."), ("ffn.2.", "ffn.net.2."),
    ("norm3.", "norm2."), ("modulation", "scale_shift_table"),
]
_TOP_RENAMES = [
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.modulation", "scale_shift_table"), ("head.head.", "proj_out."),
]
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")


def _rename(name: str, block_pairs, top_pairs) -> str:
    m = _BLOCK.match(name)
    if m:
        rest = m.group(2)
        for a, b in block_pairs:
            if rest.startswith(a):
                rest = b + rest[len(a):]
                break
        return f"blocks.{m.group(1)}.{rest}"
    for a, b in top_pairs:
        if name.startswith(a):
            return b + name[len(a):]
    return name


def wan_to_diffusers(name: str) -> str:
    return _rename(name, _BLOCK_RENAMES, _TOP_RENAMES)


def diffusers_to_wan(name: str) -> str:
    flip = lambda pairs: [(b, a) for a, b in pairs]  # noqa: E731
    return _rename(name, flip(_BLOCK_RENAMES), flip(_TOP_RENAMES))


# ---------------------------------------------------------------------- configs
def config_to_json(cfg: DiTConfig, fmt: str) -> dict:
    extra = {k: getattr(cfg, k) for k in EXTRA_FIELDS}
    if fmt == "diffusers":
        return {
            "_class_name": "WanTransformer3DModel", "patch_size": list(cfg.patch_size),
            "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim,
            "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "text_dim": cfg.text_dim,
            "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers,
            "cross_attn_norm": cfg.cross_attn_norm, "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None,
            "eps": cfg.eps, "image_dim": None, "added_kv_proj_dim": None,
            "rope_max_seq_len": cfg.rope_max_len, EXTRA_KEY: extra,
        }
    return {
        "_class_name": "WanModel", "model_type": "t2v", "patch_size": list(cfg.patch_size),
        "text_len": cfg.text_len, "in_dim": cfg.in_channels, "dim": cfg.dim, "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim, "text_dim": cfg.text_dim, "out_dim": cfg.out_channels,
        "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "qk_norm": cfg.qk_norm,
        "cross_attn_norm": cfg.cross_attn_norm, "eps": cfg.eps, EXTRA_KEY: extra,
    }


def _json_count(raw: dict, key: str, source: str) -> int:
    """A count that is multiplied before DiTConfig checks it: a JSON whole number >= 1 (a string
    "2" times 48 would be a 48-character string, not 96)."""
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{source}: {key} must be a whole number >= 1, got {value!r}")
    return value


def config_from_json(raw: dict, source: str) -> tuple[DiTConfig, str]:
    """(DiTConfig, format) from a config.json of either library."""
    extra = raw.get(EXTRA_KEY, {})
    if not isinstance(extra, dict):
        raise CheckpointError(f"{source}: the {EXTRA_KEY!r} entry must be a JSON object of forcelab settings "
                              f"({', '.join(EXTRA_FIELDS)}), got {type(extra).__name__}; restore it or re-save "
                              f"the checkpoint")
    unknown = sorted(set(extra) - set(EXTRA_FIELDS))
    if unknown:
        raise CheckpointError(f"{source}: unknown {EXTRA_KEY!r} settings {unknown}; known: {', '.join(EXTRA_FIELDS)}")
    extra = dict(extra)
    try:
        if "num_attention_heads" in raw:  # diffusers
            if raw.get("image_dim") or raw.get("added_kv_proj_dim"):
                raise CheckpointError(f"{source}: image-to-video checkpoints (image_dim / added_kv_proj_dim) "
                                      f"are not supported; use a text-to-video checkpoint")
            heads = _json_count(raw, "num_attention_heads", source)
            cfg = DiTConfig(
                in_channels=raw.get("in_channels", 16), out_channels=raw.get("out_channels", 16),
                dim=heads * _json_count(raw, "attention_head_dim", source), ffn_dim=raw["ffn_dim"], num_heads=heads,
                num_layers=raw["num_layers"], patch_size=tuple(raw.get("patch_size", (1, 2, 2))),
                freq_dim=raw.get("freq_dim", 256), text_dim=raw.get("text_dim", 4096),
                eps=raw.get("eps", 1e-6), qk_norm=raw.get("qk_norm") is not None,
                cross_attn_norm=raw.get("cross_attn_norm", True),
                rope_max_len=raw.get("rope_max_seq_len", 1024), **extra)
            return cfg, "diffusers"
        if "dim" in raw and "num_heads" in raw:  # original Wan
            if raw.get("model_type", "t2v") != "t2v":
                raise CheckpointError(f"{source}: model_type {raw['model_type']!r} is not supported; "
                                      f"forcelab loads text-to-video (t2v) checkpoints")
            extra.setdefault("text_len", raw.get("text_len", 512))
            cfg = DiTConfig(
                in_channels=raw.get("in_dim", 16), out_channels=raw.get("out_dim", 16), dim=raw["dim"],
                ffn_dim=raw["ffn_dim"], num_heads=raw["num_heads"], num_layers=raw["num_layers"],
                patch_size=tuple(raw.get("patch_size", (1, 2, 2))), freq_dim=raw.get("freq_dim", 256),
                text_dim=raw.get("text_dim", 4096), eps=raw.get("eps", 1e-6),
                qk_norm=raw.get("qk_norm", True), cross_attn_norm=raw.get("cross_attn_norm", True), **extra)
            return cfg, "wan"
    except ConfigError as e:  # a value the model cannot be built with (0 heads, -1 layers)
        raise CheckpointError(f"{source}: {e}") from None
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{source}: config.json lacks or mistypes {e}") from None
    raise CheckpointError(f"{source}: not a Wan2.1 or diffusers WanTransformer3DModel config.json")


def read_config(path: str | os.PathLike) -> tuple[DiTConfig, str]:
    path = recover(path)  # finishes a save that was killed between its two renames
    cfg_file = path / "config.json"
    if path.is_file():
        raise CheckpointError(f"{path}: a file; give the checkpoint directory (config.json + safetensors)")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json (expected a Wan2.1 or diffusers checkpoint directory)")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e}); restore it or re-save the checkpoint (UTF-8 JSON)") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object of settings, got {type(raw).__name__}")
    return config_from_json(raw, str(cfg_file))


# ---------------------------------------------------------------------- weights
def weight_files(path: Path) -> list[Path]:
    """The weight files to read: the shards the index lists, else the one weights file.

    Without an index only diffusers' file name is read when present (a stray *.safetensors
    beside it is ignored); several other *.safetensors without an index are ambiguous."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e}); "
                                  f"restore it or re-save the checkpoint") from None
        if any(Path(n).name != n for n in names):
            raise CheckpointError(f"{index}: shard names must be file names inside the folder, got {names[:4]}")
        files = [path / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shards that are missing: {', '.join(missing)}")
        return files
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("."))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights found")
    if len(files) > 1:
        raise CheckpointError(f"{path}: {len(files)} weight files ({', '.join(f.name for f in files[:4])}) "
                              f"and no {INDEX_NAME}; keep one weights file ({WEIGHTS_NAME}) or add the index")
    return files


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(folder: Path, what: str) -> None:
    """Refuse a model folder without *.safetensors weights (ForcelabError naming it): forcelab
    loads safetensors only, because unpickling a .bin / .pt can run code from the file. The
    library loaders are also asked for safetensors explicitly (use_safetensors=True)."""
    weights = [p for p in folder.glob("*.safetensors") if not p.name.startswith(".")]
    if weights:
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ForcelabError(f"{what} {folder}: holds pickle weights only ({', '.join(pickles[:3])}); forcelab "
                            f"loads safetensors only (unpickling can run code) - convert them to .safetensors "
                            f"with a tool you trust, or download the safetensors release")
    raise ForcelabError(f"{what} {folder}: no *.safetensors weights in this folder")


def load_state_into(model: torch.nn.Module, path: Path, fmt: str, dtype=None, device=None) -> None:
    """Materialise model's (meta) parameters from the checkpoint, one tensor at a time; a
    tensor with NaN or inf values is refused (CheckpointError naming it and its file)."""
    params = dict(model.named_parameters())
    for file, entries in itertools.groupby(read_plan(model, path, fmt), key=lambda e: e.file):
        with open_weights(file) as f:
            for entry in entries:
                param = params[entry.name]
                target = torch.float32 if dtype is not None and model.keeps_fp32(entry.name) else dtype
                stored = check_floating(f.get_tensor(entry.key), file, entry.key)
                tensor = check_finite(stored.to(dtype=target or param.dtype, device=device or "cpu"), file, entry.key)
                _set_parameter(model, entry.name, tensor, param.requires_grad)


@dataclass(frozen=True)
class PlanEntry:
    name: str       # the model's parameter (original Wan name)
    file: Path      # the safetensors file holding it
    key: str        # its name in that file (Wan or diffusers)
    shape: tuple    # its shape (the parameter's: checked)


def open_weights(file: Path):
    """safe_open on one weights file; a file safetensors cannot read is a CheckpointError."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error classes
        raise CheckpointError(f"{file}: cannot read safetensors ({e}); the file may be truncated") from None


def read_plan(model: torch.nn.Module, path: Path, fmt: str) -> list[PlanEntry]:
    """Where each of model's parameters is stored, from the files' headers alone (no tensor is
    read), in file order. A weight stored twice, and a checkpoint whose names or shapes do not
    match the model (missing, unexpected, shape conflicts), are refused in one CheckpointError."""
    expected = dict(model.named_parameters())
    plan, found, unexpected, conflicts, seen = [], set(), [], [], {}
    for file in weight_files(path):
        with open_weights(file) as f:
            for key in f.keys():
                if key in seen:
                    raise CheckpointError(f"{path}: weight {key!r} is in both {seen[key]} and {file.name}; "
                                          f"a checkpoint holds each weight once - remove the stray file")
                seen[key] = file.name
                name = diffusers_to_wan(key) if fmt == "diffusers" else key
                if name not in expected:
                    unexpected.append(key)
                    continue
                found.add(name)  # present, maybe just the wrong size: not "missing"
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(expected[name].shape):
                    conflicts.append(f"{key}: checkpoint {shape} vs model {tuple(expected[name].shape)}")
                    continue
                plan.append(PlanEntry(name, file, key, shape))
    check_match(model, path, sorted(set(expected) - found), unexpected, conflicts)
    return plan


def check_floating(stored: torch.Tensor, file: Path, key: str) -> torch.Tensor:
    """stored itself; a weight that is not floating point is refused (CheckpointError naming it)."""
    if not stored.is_floating_point():
        raise CheckpointError(f"{file}: weight {key!r} is stored as {stored.dtype}; DiT weights are "
                              f"floating point - the file is not a DiT checkpoint or was damaged")
    return stored


def check_finite(tensor: torch.Tensor, file: Path, key: str) -> torch.Tensor:
    """tensor itself; one holding NaN or inf values is refused (CheckpointError naming it)."""
    if not bool(torch.isfinite(tensor).all()):
        raise CheckpointError(f"{file}: weight {key!r} holds NaN or inf values (as {tensor.dtype}); "
                              f"the checkpoint is damaged or came from a diverged run - load an "
                              f"earlier checkpoint")
    return tensor


def check_match(model: torch.nn.Module, path: Path, missing: list, unexpected: list, conflicts: list) -> None:
    """One CheckpointError listing the shape conflicts, missing and unexpected keys, if any."""
    if missing or unexpected or conflicts:
        lines = []
        if conflicts:
            lines.append(f"shape conflicts ({len(conflicts)}): " + "; ".join(conflicts[:8]))
        if missing:
            lines.append(f"missing keys ({len(missing)}): " + ", ".join(missing[:8]))
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:8]))
        raise CheckpointError(f"{path}: checkpoint does not match the model config "
                              f"(dim={model.config.dim}, layers={model.config.num_layers}): " + " | ".join(lines))


def _set_parameter(model: torch.nn.Module, name: str, tensor: torch.Tensor, requires_grad: bool) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    owner._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=requires_grad)


_OS_ERROR = re.compile(r"\(os error (\d+)\)")   # how safetensors reports the system's error


def _write_weights(tensors: dict, file: Path, destination: Path) -> None:
    """save_file, with the system's errors (a full disk, a read-only folder) raised as the
    OSError they are, naming the destination folder (safetensors wraps them in its own class)."""
    try:
        save_file(tensors, str(file), metadata={"format": "pt"})
    except SafetensorError as e:
        code = _OS_ERROR.search(str(e))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(destination)) from None


def save_state(model: torch.nn.Module, path: str | os.PathLike, fmt: str = "diffusers",
               max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = True) -> Path:
    """Write config.json + safetensors (sharded past max_shard_bytes, with an index) atomically
    (fsio.atomic_directory). overwrite: replace an earlier forcelab save at `path`; a folder
    forcelab did not write is never replaced (ForcelabError, before any work)."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; choose one of {FORMATS}")
    path = Path(path).expanduser()
    state = {(wan_to_diffusers(k) if fmt == "diffusers" else k): v.detach().contiguous()
             for k, v in model.state_dict().items()}
    shards, size = [{}], 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    with atomic_directory(path, overwrite=overwrite, what="checkpoint") as tmp:
        if len(shards) == 1:
            _write_weights(shards[0], tmp / WEIGHTS_NAME, path)
        else:
            stem = WEIGHTS_NAME.removesuffix(".safetensors")
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
                _write_weights(shard, tmp / name, path)
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in state.values())
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                                      "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config_to_json(model.config, fmt), indent=2))
    return path
