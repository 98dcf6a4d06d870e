"""Launch configurations of the Triton attention kernels and their autotuning.

Each kernel (forward, dK/dV, dQ) has a short list of shipped configs (tile sizes,
warps, pipeline stages) per head dim and dtype class, chosen so that none spills registers
on sm_90a (`bench/kernels_sm90.py` prints the compile report of every one). The first is
the default; with autotuning on (FORCELAB_ATTENTION_AUTOTUNE, default on for compiled
GPU runs, "0" for tests) every config of the list is timed once per tuning key - kernel,
head dim, dtype, dense or not, and the query / key lengths rounded up to a power of two (a
filling streaming cache does not re-tune at every length) - and the winner is kept in
memory and in a JSON file (FORCELAB_ATTENTION_TUNING, default
~/.cache/forcelab/attention_tuning.json) so later processes skip the timing. Tile sizes are
tuned too: the visit tables are built per (layout, tile sizes) on demand. fp32 inputs use
small tiles (fp32 "ieee" dots do not use tensor cores; big tiles spill and take tens of
seconds to compile); the automatic backend sends fp32 to the torch reference anyway.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from .triton_attention import INTERPRETED

AUTOTUNE_ENV = "FORCELAB_ATTENTION_AUTOTUNE"
FUSED_DQ_ENV = "FORCELAB_ATTENTION_FUSED_DQ"  # "1": dQ inside the dK/dV kernel (atomics)
TUNING_FILE_ENV = "FORCELAB_ATTENTION_TUNING"
TUNING_WARMUP_MS, TUNING_REP_MS = 5, 25


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration of one kernel: a BLOCK_M x BLOCK_N tile (query rows x key
    columns), warps and software-pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Shipped configs: kernel -> (head dims, dtype class) -> candidates, default first. Every
# 16-bit config compiles for sm_90a without spills and, but for dQ's alternative, with 3
# pipeline buffers (bench/kernels_sm90.py prints the report). At head dim 128, 4 warps
# cannot hold the forward's fp32 accumulators (255 registers and spills), hence 8; the
# backward's tiles give each warpgroup its own 64 rows of every product (no product is
# computed twice by two warpgroups, no n16 wgmma), and dK/dV 64 x 128 spills here (its
# fp32 dK, dV accumulators plus K, V fill 255 registers), so 32 x 128 and 64 x 64 are used.
# fp32 ("ieee", no tensor cores) uses small tiles: few registers, seconds to compile.
_FP32 = (KernelConfig(32, 32, 8, 1),)
CONFIGS: dict[str, dict[tuple[str, str], tuple[KernelConfig, ...]]] = {
    "fwd": {
        ("d128", "16bit"): (KernelConfig(128, 64, 8, 3), KernelConfig(128, 128, 8, 3)),
        ("d64", "16bit"): (KernelConfig(128, 64, 4, 3), KernelConfig(128, 128, 8, 3)),
        ("any", "fp32"): _FP32,
    },
    "dkdv": {
        ("d128", "16bit"): (KernelConfig(32, 128, 8, 3), KernelConfig(64, 64, 8, 3)),
        ("d64", "16bit"): (KernelConfig(64, 128, 8, 3), KernelConfig(32, 128, 8, 3)),
        ("any", "fp32"): _FP32,
    },
    "dq": {
        ("d128", "16bit"): (KernelConfig(128, 64, 8, 3), KernelConfig(64, 64, 4, 2)),
        ("d64", "16bit"): (KernelConfig(128, 64, 8, 3), KernelConfig(128, 32, 4, 3)),
        ("any", "fp32"): _FP32,
    },
}
# Under the interpreter: small tiles keep frame boundaries inside tiles and fully masked
# tiles present even in small test shapes; warps and stages do not matter there.
INTERPRETER_CONFIG = KernelConfig(32, 32, 4, 1)


def shipped_configs(kernel: str, head_dim: int, dtype: torch.dtype) -> tuple[KernelConfig, ...]:
    """The candidate configs of `kernel` ("fwd", "dkdv", "dq") for these inputs."""
    if dtype == torch.float32:
        return CONFIGS[kernel][("any", "fp32")]
    return CONFIGS[kernel][("d128" if head_dim > 64 else "d64", "16bit")]


@dataclass(frozen=True)
class TileSizes:
    """Explicit tile sizes (tokens) of each kernel, overriding the configs (tests use it to
    put frame boundaries and masked tiles where they want them); warps and stages are the
    default config's."""

    fwd_m: int
    fwd_n: int
    dkdv_m: int
    dkdv_n: int
    dq_m: int
    dq_n: int

    def config(self, kernel: str, base: KernelConfig) -> KernelConfig:
        m, n = {"fwd": (self.fwd_m, self.fwd_n), "dkdv": (self.dkdv_m, self.dkdv_n),
                "dq": (self.dq_m, self.dq_n)}[kernel]
        return KernelConfig(m, n, base.num_warps, base.num_stages)


# ---------------------------------------------------------------------------- autotuning
def fused_dq_enabled() -> bool:
    """Opt-in (read at every backward): the dK/dV kernel also accumulates dQ with fp32
    atomics, 5 matmuls per tile pair instead of 7, but the summation order, hence the last
    bits of dQ, varies from run to run. Unmeasured on a GPU: off by default."""
    return os.environ.get(FUSED_DQ_ENV, "0") == "1"


def autotune_enabled() -> bool:
    """Read at every launch, so tests can switch tuning off (single default config)."""
    return not INTERPRETED and os.environ.get(AUTOTUNE_ENV, "1") != "0"


def _tuning_file() -> Path:
    default = Path.home() / ".cache" / "forcelab" / "attention_tuning.json"
    return Path(os.environ.get(TUNING_FILE_ENV, default))


class _Tuner:
    """Best config per tuning key, in memory and persisted as JSON (written atomically)."""

    def __init__(self):
        self.best: dict[str, KernelConfig] | None = None

    def _load(self) -> dict[str, KernelConfig]:
        if self.best is None:
            self.best = {}
            try:
                saved = json.loads(_tuning_file().read_text())
                self.best = {k: KernelConfig(*v) for k, v in saved.items()}
            except (OSError, ValueError, TypeError):
                pass  # no file yet, or unreadable: tune again
        return self.best

    def _save(self) -> None:
        path = _tuning_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({k: [c.block_m, c.block_n, c.num_warps, c.num_stages]
                                       for k, c in self.best.items()}, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # a read-only home still tunes, per process

    def pick(self, key: str, candidates, run) -> KernelConfig:
        """The fastest of `candidates` under `run(config)` (a launch), measured once."""
        best = self._load()
        if key in best and best[key] in candidates:
            return best[key]
        import triton.testing
        times = {}
        for cfg in candidates:
            try:
                times[cfg] = triton.testing.do_bench(lambda: run(cfg), warmup=TUNING_WARMUP_MS,
                                                     rep=TUNING_REP_MS)
            except triton.runtime.errors.OutOfResources:
                continue  # shared memory / registers of this card: not a candidate here
        if not times:
            raise RuntimeError(f"attention autotuning: no config of {key} runs on this GPU")
        best[key] = min(times, key=times.get)
        self._save()
        return best[key]


_TUNER = _Tuner()


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


def choose_config(kernel: str, q: torch.Tensor, Lq: int, Lk: int, dense: bool, run,
                  sizes: TileSizes | None, variant: str = "") -> KernelConfig:
    """The config a launch uses: interpreter / explicit sizes / default / tuned (variant:
    a kernel variant timed separately, e.g. dK/dV with the fused dQ)."""
    D = q.shape[-1]
    if INTERPRETED:
        base = INTERPRETER_CONFIG
        return sizes.config(kernel, base) if sizes is not None else base
    candidates = shipped_configs(kernel, D, q.dtype)
    if sizes is not None:
        return sizes.config(kernel, candidates[0])
    if len(candidates) == 1 or not autotune_enabled():
        return candidates[0]
    device = torch.cuda.get_device_name(q.device)
    key = (f"{kernel}{variant}|{device}|triton {triton.__version__}|D{D}|{str(q.dtype)[6:]}|"
           f"{'dense' if dense else 'sparse'}|Lq{_bucket(Lq)}|Lk{_bucket(Lk)}")
    return _TUNER.pick(key, candidates, run)


