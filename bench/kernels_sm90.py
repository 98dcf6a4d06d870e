"""Ahead-of-time compile report of every shipped attention kernel config for Hopper (sm_90a).

    python bench/kernels_sm90.py                   # 16-bit configs, head dims 128 and 64
    python bench/kernels_sm90.py --fp32 --dense    # + the fp32 configs, + the DENSE variants

No GPU is needed: each config of `triton_configs.CONFIGS` is compiled by Triton for
GPUTarget("cuda", 90) and the result is read back, as the GPU would run it:
- registers and spills: `ptxas -v --gpu-name sm_90a` on the generated PTX (the ptxas
  bundled with triton; its newest one, as the PTX may need it);
- shared memory: the compiled kernel's metadata (Hopper: 227 KiB usable per block);
- tensor-core work: `warp_group_dot` ops in the TTGIR (wgmma) and the wgmma shapes in the PTX;
- pipelining: the leading dimension of the multi-buffered shared-memory allocations of the
  streamed 16-bit (or fp32) operands (K/V in the forward and dQ, Q/dO in dK/dV) = how many
  tiles the software pipeline keeps in flight.
Pointers and strides are marked divisible by 16, as Triton specialises them at run time for
contiguous [B, L, H, D] tensors. The sparse variant is block-causal (the training layout);
`--dense` adds the DENSE variants. Compiling is CPU-heavy (seconds per config, fp32 "ieee"
much more): configs are compiled one at a time.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, never interpret

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from forcelab.kernels import triton_attention as kernels  # noqa: E402
from forcelab.kernels import triton_configs as configs  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_SMEM = 227 * 1024
KERNELS = {"fwd": kernels.attention_fwd, "dkdv": kernels.attention_bwd_dkdv,
           "dq": kernels.attention_bwd_dq}
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
FLOAT_SCALARS = ("qk_scale", "sm_scale")
FLOAT_POINTERS = ("LSE", "DELTA", "DQ_ACC")
INT_POINTERS = ("QF", "KF", "QN", "KN", "ORDER", "RUN_START", "RUN_FULL", "RUNS",
                "VISIT_START", "VISIT_FULL", "VISIT_TILES")  # (the last three: older kernels)


def ptxas() -> str:
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        if (bin_dir / name).exists():
            return str(bin_dir / name)
    raise SystemExit("no ptxas bundled with this triton")


def compile_config(kernel: str, cfg, head_dim: int, dtype: torch.dtype, dense: bool,
                   fused_dq: bool = False):
    fn = KERNELS[kernel]
    names = fn.arg_names
    first_scalar = names.index("stride_qb")
    constexprs = dict(DENSE=dense, HAS_CHUNK=not dense, HAS_WINDOW=False, HAS_SINK=False,
                      NOISY=False, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      HEAD_DIM=head_dim, UPCAST=False,
                      PRECISION="ieee" if dtype == torch.float32 else "tf32")
    if "FUSED_DQ" in names:
        constexprs["FUSED_DQ"] = fused_dq
    signature = {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif i < first_scalar:   # pointers: tensors in the input dtype, fp32 or int32 tables
            if name in FLOAT_POINTERS:
                signature[name] = "*fp32"
            elif name in INT_POINTERS:
                signature[name] = "*i32"
            else:
                signature[name] = "*" + TRITON_TYPES[dtype]
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
             if signature[name].startswith("*") or name.startswith("stride")}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    start = time.perf_counter()
    compiled = triton.compile(src, target=HOPPER, options={"num_warps": cfg.num_warps,
                                                           "num_stages": cfg.num_stages})
    return compiled, time.perf_counter() - start


def read_report(compiled, dtype: torch.dtype) -> dict:
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        result = subprocess.run([ptxas(), "-v", "--gpu-name", "sm_90a", str(path), "-o",
                                 os.devnull], capture_output=True, text=True, check=True)
    log = result.stderr + result.stdout
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spill_stores = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))
    spill_loads = sum(int(n) for n in re.findall(r"(\d+) bytes spill loads", log))
    element = TRITON_TYPES[dtype]
    buffers = [int(n) for n in re.findall(
        rf"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x\d+x\d+x{element}", ttgir)]
    shapes = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)))
    return dict(registers=registers, spill_stores=spill_stores, spill_loads=spill_loads,
                shared=compiled.metadata.shared, wgmma=ttgir.count("warp_group_dot "),
                wgmma_shapes=shapes, buffers=max(buffers, default=1))


ROPE_WIDTH, ROPE_HEAD_DIM = 1536, 128   # Wan-1.3B: 12 heads x 128


def compile_rope(fn, constexprs: dict, dtype: torch.dtype, num_warps: int):
    """The fused QK-norm + RoPE kernel at Wan-1.3B's width (x, weight, out in dtype)."""
    names = fn.arg_names
    floats = {"COS", "SIN", "RSTD", "DW_PARTIAL"}
    first_scalar = names.index("stride_xb")
    signature = {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif i < first_scalar:
            signature[name] = "*fp32" if name in floats else "*" + TRITON_TYPES[dtype]
        else:
            signature[name] = "fp32" if name == "eps" else "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
             if signature[name].startswith("*") or name.startswith("stride") or name == "C"}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    start = time.perf_counter()
    compiled = triton.compile(src, target=HOPPER, options={"num_warps": num_warps})
    return compiled, time.perf_counter() - start


def rope_report(dtype: torch.dtype) -> None:
    from forcelab.kernels import triton_rope
    from forcelab.kernels import triton_rope_launch as rope_launch
    tiles = rope_launch._tiles(ROPE_WIDTH, 1 << 20)
    common = dict(HALF_D=ROPE_HEAD_DIM // 2, BLOCK_R=tiles["BLOCK_R"], BLOCK_C=tiles["BLOCK_C"])
    kernels_ = (("fwd", triton_rope.qk_norm_rope_fwd, common),
                ("bwd", triton_rope.qk_norm_rope_bwd,
                 dict(common, NUM_CHUNKS=triton.next_power_of_2(ROPE_WIDTH // tiles["BLOCK_C"]))))
    print(f"\n# fused QK-norm + RoPE at width {ROPE_WIDTH} ({TRITON_TYPES[dtype]}): "
          f"{tiles['BLOCK_R']} rows x {tiles['BLOCK_C']} columns per chunk, "
          f"{tiles['num_warps']} warps")
    print(f"{'kernel':6s} {'regs':>4s} {'spill st/ld':>11s} {'global loads':>12s} "
          f"{'of them vector':>14s} {'global stores':>13s} {'vector':>6s}")
    for name, fn, constexprs in kernels_:
        compiled, _ = compile_rope(fn, constexprs, dtype, tiles["num_warps"])
        r = read_report(compiled, dtype)
        ptx = compiled.asm["ptx"]
        loads = re.findall(r"ld\.global(?:\.\w+)*", ptx)
        stores = re.findall(r"st\.global(?:\.\w+)*", ptx)
        vec = [x for x in loads if ".v2" in x or ".v4" in x]
        vst = [x for x in stores if ".v2" in x or ".v4" in x]
        print(f"{name:6s} {r['registers']:4d} {r['spill_stores']:>5d}/{r['spill_loads']:<5d} "
              f"{len(loads):12d} {len(vec):14d} {len(stores):13d} {len(vst):6d}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dims", type=int, nargs="*", default=[128, 64])
    p.add_argument("--kernels", nargs="*", default=list(KERNELS))
    p.add_argument("--fp32", action="store_true", help="also the fp32 (small-tile) configs")
    p.add_argument("--dense", action="store_true", help="also the DENSE kernel variants")
    p.add_argument("--no-rope", action="store_true", help="skip the QK-norm + RoPE kernels")
    p.add_argument("--no-fused-dq", action="store_true",
                   help="skip dK/dV with the fused dQ (opt-in variant, FORCELAB_ATTENTION_FUSED_DQ)")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"# sm_90a compile report: triton {triton.__version__}, {Path(ptxas()).name}; "
          f"Hopper shared memory limit {HOPPER_SMEM // 1024} KiB")
    print(f"{'kernel':7s} {'variant':7s} {'D':>3s} {'dtype':5s} {'tile':>8s} {'warps':>5s} "
          f"{'stages':>6s} {'regs':>4s} {'spill st/ld':>11s} {'smem KiB':>8s} {'wgmma':>5s} "
          f"{'buffers':>7s} {'compile s':>9s}  wgmma shapes  (compile s 0.0: from Triton's cache)")
    problems = []
    dtypes = [torch.bfloat16] + ([torch.float32] if args.fp32 else [])
    for dtype in dtypes:
        head_dims = args.head_dims if dtype != torch.float32 else args.head_dims[:1]
        for head_dim in head_dims:
            kernel_list = list(args.kernels)
            if "dkdv" in kernel_list and not args.no_fused_dq:
                kernel_list.insert(kernel_list.index("dkdv") + 1, "dkdv+dq")
            for kernel in kernel_list:
                base = kernel.split("+")[0]
                for cfg in configs.shipped_configs(base, head_dim, dtype):
                    for dense in (False, True) if args.dense else (False,):
                        compiled, seconds = compile_config(base, cfg, head_dim, dtype, dense,
                                                           fused_dq=kernel == "dkdv+dq")
                        r = read_report(compiled, dtype)
                        variant = "dense" if dense else "sparse"
                        print(f"{kernel:7s} {variant:7s} {head_dim:3d} {TRITON_TYPES[dtype]:5s} "
                              f"{cfg.block_m:>3d}x{cfg.block_n:<4d} {cfg.num_warps:5d} "
                              f"{cfg.num_stages:6d} {r['registers']:4d} "
                              f"{r['spill_stores']:>5d}/{r['spill_loads']:<5d} "
                              f"{r['shared'] / 1024:8.1f} {r['wgmma']:5d} {r['buffers']:7d} "
                              f"{seconds:9.1f}  {' '.join(r['wgmma_shapes']) or '-'}",
                              flush=True)
                        name = f"{kernel} {variant} D{head_dim} {dtype} {cfg}"
                        if dtype != torch.float32 and r["spill_stores"] and kernel != "dkdv+dq":
                            problems.append(f"{name}: spills")
                        if r["shared"] > HOPPER_SMEM:
                            problems.append(f"{name}: shared memory over the limit")
                        if (kernel == "fwd" and dtype != torch.float32 and not dense
                                and r["buffers"] < 3 and cfg.num_stages >= 3):
                            problems.append(f"{name}: fewer than 3 K/V buffers")
    if not args.no_rope:
        rope_report(torch.bfloat16)
    print("\n" + ("\n".join(f"PROBLEM {p}" for p in problems) if problems else
                  "no spills in any shipped 16-bit config (the opt-in dkdv+dq variant is "
                  "reported, not required); shared memory within the limit; "
                  "sparse forward keeps >= 3 K/V buffers where num_stages >= 3"))


if __name__ == "__main__":
    main()
