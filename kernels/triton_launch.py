"""Host side of the Triton attention: kernel configs, autotuning, per-layout plans, launches.

The kernels (and their math) are in `triton_attention.py`. This module imports triton, so
`dispatch.py` imports it lazily, on the first call with backend "triton": that first import
is when TRITON_INTERPRET is read (see `INTERPRETED`). Under the interpreter the kernels run
on CPU tensors, one configuration, 16-bit tiles widened to fp32 before they meet tl.dot.

Configs. Each kernel (forward, dK/dV, dQ) has a short list of shipped configs (tile sizes,
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

Plans. The visit tables depend only on who sees whom (`AttentionLayout.mask_key`) and the
tile sizes, so they are cached on that key: consecutive chunks of a stream, whose frame ids
differ, share them. Tables are built lazily per kernel (inference never builds the two
backward ones) and reach the GPU in one non-blocking copy from pinned memory. Dense layouts
build nothing. Launches run under the tensors' device (`torch.cuda.device(q.device)`).

Triton's own library (tl.sum, tl.max, tl.zeros, ...) is @triton.jit code too, decorated when
triton itself is first imported, which is often earlier and elsewhere: torch._dynamo imports
triton (diffusers and torch.compile do). If that happened before TRITON_INTERPRET=1 was set,
`interpret_triton_library` wraps those functions for the interpreter, as an early variable
would have.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from . import triton_attention as kernels
from .dispatch import TRITON_DTYPES as SUPPORTED_DTYPES
from .dispatch import TRITON_HEAD_DIMS as SUPPORTED_HEAD_DIMS
from .layout import AttentionLayout, TileRuns

INTERPRETED = kernels.INTERPRETED


def interpret_triton_library() -> None:
    """Re-wrap triton's library functions that were decorated for compilation (TRITON_INTERPRET
    was unset when triton was imported) so that interpreted kernels can call them. Runs only
    under the interpreter, which then owns the process anyway (no compiled kernel runs)."""
    import triton.language as tl
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:  # another triton layout: nothing to re-wrap; set the variable earlier
        return

    for module in (tl.standard, tl.random):
        for name, fn in list(vars(module).items()):
            if isinstance(fn, JITFunction):
                wrapped = InterpretedFunction(fn.fn)
                setattr(module, name, wrapped)
                if getattr(tl, name, None) is fn:
                    setattr(tl, name, wrapped)


if INTERPRETED:
    interpret_triton_library()
LOG2E = math.log2(math.e)
TABLE_CACHE_SIZE = 256  # (mask, kernel, tile sizes) visit tables kept per process
AUTOTUNE_ENV = "FORCELAB_ATTENTION_AUTOTUNE"
FUSED_DQ_ENV = "FORCELAB_ATTENTION_FUSED_DQ"  # "1": dQ inside the dK/dV kernel (atomics)
TUNING_FILE_ENV = "FORCELAB_ATTENTION_TUNING"
TUNING_WARMUP_MS, TUNING_REP_MS = 5, 25
DELTA_ROWS = 64         # rows per program of the Delta = rowsum(dO * O) pre-pass


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


# ---------------------------------------------------------------------------- plans
_TABLES: OrderedDict = OrderedDict()


def _upload(parts: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Int32 CPU tensors -> views of ONE device tensor, copied without a host sync (pinned
    source, non-blocking; the caching host allocator keeps it alive until the copy ran)."""
    flat = torch.cat([p.reshape(-1).int() for p in parts])
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    out, offset = [], 0
    for p in parts:
        out.append(flat[offset:offset + p.numel()].view(p.shape))
        offset += p.numel()
    return out


def tile_runs(layout: AttentionLayout, kernel: str, cfg: KernelConfig,
              device: torch.device) -> TileRuns:
    """The run table of `kernel` for `layout` on `device`, cached on the layout's mask."""
    key = (layout.mask_key(), kernel, cfg.block_m, cfg.block_n, str(device))
    if key in _TABLES:
        _TABLES.move_to_end(key)
        return _TABLES[key]
    runs = layout.tile_runs(cfg.block_m, cfg.block_n, "key" if kernel == "dkdv" else "query")
    table = TileRuns(*_upload([runs.start, runs.num_full, runs.runs, runs.order], device))
    _TABLES[key] = table
    if len(_TABLES) > TABLE_CACHE_SIZE:
        _TABLES.popitem(last=False)
    return table


def _frame_ids(layout: AttentionLayout, device: torch.device) -> dict:
    """Per-frame ids and rule parameters of a layout on `device` (memoised on the layout,
    which the DiT shares between all layers of a pass)."""
    def build():
        qf, kf, qn, kn = _upload(list(layout.frame_ids()), device)
        return dict(QF=qf, KF=kf, QN=qn, KN=kn, S=layout.tokens_per_frame,
                    chunk=layout.chunk_frames or 1, window=layout.window_frames or 0,
                    sink=layout.sink_frames, HAS_CHUNK=layout.chunk_frames is not None,
                    HAS_WINDOW=layout.window_frames is not None,
                    HAS_SINK=layout.sink_frames > 0, NOISY=layout.q_noisy is not None)
    return layout._memo(("triton ids", str(device)), build)


def _placeholder(device: torch.device) -> torch.Tensor:
    """A table argument DENSE kernels never read."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def _rule_args(layout: AttentionLayout, device: torch.device, dense: bool) -> dict:
    if not dense:
        return _frame_ids(layout, device)
    none = _placeholder(device)
    return dict(QF=none, KF=none, QN=none, KN=none, S=layout.tokens_per_frame, chunk=1,
                window=0, sink=0, HAS_CHUNK=False, HAS_WINDOW=False, HAS_SINK=False,
                NOISY=False)


def _run_args(layout, kernel, cfg, device, dense) -> dict:
    if dense:
        none = _placeholder(device)
        return dict(ORDER=none, RUN_START=none, RUN_FULL=none, RUNS=none)
    t = tile_runs(layout, kernel, cfg, device)
    return dict(ORDER=t.order, RUN_START=t.start, RUN_FULL=t.num_full, RUNS=t.runs)


def host_plan(layout: AttentionLayout, device: torch.device, dtype: torch.dtype,
              grad: bool, head_dim: int = 128) -> None:
    """Build what a launch of `layout` needs on the host (ids, the forward's table; the
    backward's when grad) with the default configs: benchmarks time the host side with it."""
    dense = layout.is_dense()
    if dense:
        return
    _frame_ids(layout, device)
    for kernel in ("fwd", "dkdv", "dq") if grad else ("fwd",):
        base = INTERPRETER_CONFIG if INTERPRETED else shipped_configs(kernel, head_dim, dtype)[0]
        tile_runs(layout, kernel, base, device)


# ---------------------------------------------------------------------------- launches
def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, token) strides of a [B, L, H, D] tensor with unit stride over D."""
    return t.stride(0), t.stride(2), t.stride(1)


def _precision(dtype: torch.dtype) -> dict:
    """fp32 stays fp32 on a GPU (no TF32: the fp32 tolerance is 1e-5); 16-bit dots use the
    tensor cores; the interpreter widens 16-bit tiles (its 16-bit dot is wrong)."""
    return dict(UPCAST=INTERPRETED and dtype != torch.float32,
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def on_device(t: torch.Tensor):
    """Launch on the tensors' GPU, not on the current one (multi-GPU without set_device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch_options(cfg: KernelConfig) -> dict:
    if INTERPRETED:
        return {}
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Triton-specific limits (shapes were checked by `dispatch.attention`)."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"triton attention: q/k/v dtype {q.dtype} is not supported; "
                         f"use one of {SUPPORTED_DTYPES}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"triton attention: head dim {q.shape[-1]} (last dim of q, k, v) is "
                         f"not supported; use one of {SUPPORTED_HEAD_DIMS} or backend='torch'")


def attention_forward(q, k, v, layout: AttentionLayout, sizes: TileSizes | None = None):
    """q [B, Lq, H, D], k/v [B, Lk, H, D] -> (out [B, Lq, H, D], lse [B, H, Lq] fp32, base 2)."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    out = torch.empty(B, Lq, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    if Lq == 0:
        return out, lse
    dense = layout.is_dense()
    with on_device(q):
        rule = _rule_args(layout, q.device, dense)

        def run(cfg):
            runs = _run_args(layout, "fwd", cfg, q.device, dense)
            kernels.attention_fwd[(B * H, triton.cdiv(Lq, cfg.block_m))](
                q, k, v, out, lse, rule["QF"], rule["KF"], rule["QN"], rule["KN"],
                runs["ORDER"], runs["RUN_START"], runs["RUN_FULL"], runs["RUNS"],
                *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                H, Lq, Lk, rule["S"], LOG2E / math.sqrt(D), rule["chunk"], rule["window"],
                rule["sink"], DENSE=dense, HAS_CHUNK=rule["HAS_CHUNK"],
                HAS_WINDOW=rule["HAS_WINDOW"], HAS_SINK=rule["HAS_SINK"], NOISY=rule["NOISY"],
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=D, **_precision(q.dtype),
                **_launch_options(cfg))

        run(choose_config("fwd", q, Lq, Lk, dense, run, sizes))
    return out, lse


def attention_backward(do, q, k, v, out, lse, layout: AttentionLayout,
                       sizes: TileSizes | None = None):
    """dO [B, Lq, H, D] -> (dq, dk, dv) in the inputs' dtype."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if Lq == 0 or Lk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    dense = layout.is_dense()
    sm_scale = 1.0 / math.sqrt(D)
    with on_device(q):
        rule = _rule_args(layout, q.device, dense)
        delta = torch.empty_like(lse)
        kernels.attention_bwd_delta[(triton.cdiv(Lq, DELTA_ROWS), B * H)](
            out, do, delta, *_strides(out), *_strides(do), H, Lq, BLOCK_M=DELTA_ROWS,
            HEAD_DIM=D)
        common = dict(H=H, Lq=Lq, Lk=Lk, S=rule["S"], sm_scale=sm_scale,
                      qk_scale=sm_scale * LOG2E, chunk=rule["chunk"], window=rule["window"],
                      sink=rule["sink"], DENSE=dense, HAS_CHUNK=rule["HAS_CHUNK"],
                      HAS_WINDOW=rule["HAS_WINDOW"], HAS_SINK=rule["HAS_SINK"],
                      NOISY=rule["NOISY"], HEAD_DIM=D, **_precision(q.dtype))
        ids = (rule["QF"], rule["KF"], rule["QN"], rule["KN"])
        fused = fused_dq_enabled()
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if fused else lse

        def run_dkdv(cfg):
            runs = _run_args(layout, "dkdv", cfg, q.device, dense)
            kernels.attention_bwd_dkdv[(B * H, triton.cdiv(Lk, cfg.block_n))](
                q, k, v, do, lse, delta, dk, dv, dq_acc, *ids,
                runs["ORDER"], runs["RUN_START"], runs["RUN_FULL"], runs["RUNS"],
                *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk),
                *(_strides(dq_acc) if fused else (0, 0, 0)),
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, FUSED_DQ=fused, **common,
                **_launch_options(cfg))

        def run_dq(cfg):
            runs = _run_args(layout, "dq", cfg, q.device, dense)
            kernels.attention_bwd_dq[(B * H, triton.cdiv(Lq, cfg.block_m))](
                q, k, v, do, lse, delta, dq, *ids,
                runs["ORDER"], runs["RUN_START"], runs["RUN_FULL"], runs["RUNS"],
                *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **common, **_launch_options(cfg))

        cfg = choose_config("dkdv", q, Lq, Lk, dense, run_dkdv, sizes, "+dq" if fused else "")
        if fused:
            dq_acc.zero_()  # tuning runs (if any) added to it
        run_dkdv(cfg)
        if fused:
            dq = (dq_acc * sm_scale).to(q.dtype)
        else:
            run_dq(choose_config("dq", q, Lq, Lk, dense, run_dq, sizes))
    return dq, dk, dv


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels index D with stride 1; any other stride is copied once."""
    return t if t.stride(-1) == 1 else t.contiguous()


class TritonAttention(torch.autograd.Function):
    """Block-sparse attention under an `AttentionLayout`, forward and backward in Triton."""

    @staticmethod
    def forward(ctx, q, k, v, layout, sizes):
        q, k, v = (_unit_stride(t) for t in (q, k, v))
        out, lse = attention_forward(q, k, v, layout, sizes)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.sizes = layout, sizes
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(_unit_stride(do), q, k, v, out, lse,
                                        ctx.layout, ctx.sizes)
        return dq, dk, dv, None, None


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout,
                     sizes: TileSizes | None = None) -> torch.Tensor:
    """q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]. `sizes` overrides the tile sizes
    of the configs (tests use it to put frame boundaries and masked tiles where they want)."""
    check_inputs(q, k, v)
    return TritonAttention.apply(q, k, v, layout, sizes)
