"""Training throughput and peak memory per recipe (toy configs, CPU), and the memory that
gradient checkpointing saves at a larger toy size.

    python bench/train.py                        # every recipe with a toy config, 1 thread
    python bench/train.py --recipes teacher self_forcing --steps 20
    python bench/train.py --wan --device cuda --checkpointing   # on a GPU: a Wan-1.3B step (MFU, memory)

Each measurement runs in its own process (one thread unless --threads): build the run, take
reset the peak-RSS counter (/proc/self/clear_refs), take --warmup then --steps timed steps.
"Peak" is the process's peak resident memory while training and "training" the part of it
above the resident memory of the built run (activations, optimizer state, rollout caches). Distillation recipes get a random toy teacher of the same size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from forcelab.bench.card import bf16_peak, device_name

ROOT = Path(__file__).resolve().parent.parent
LARGER_TOY = ["model_overrides.dim=256", "model_overrides.ffn_dim=1024", "model_overrides.num_layers=8",
              "model_overrides.num_heads=4", "data.frames=16", "data.batch_size=8"]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure(recipe: str, overrides: list[str], steps: int, warmup: int, device: str) -> dict:
    """One run in this process -> {steps_per_s, peak_mib, above_start_mib}."""
    from forcelab.models.config import DiTConfig
    from forcelab.train.config import load_train_config
    from forcelab.train.trainer import Trainer

    from forcelab.train.recipe import recipe_class

    tmp = Path(tempfile.mkdtemp(prefix="forcelab-bench-"))
    base = ROOT / "configs" / "toy" / f"{recipe}.yaml"
    extra = [f"output_dir={tmp / 'run'}", "logging.wandb=disabled", "logging.progress=false",
             "checkpoint.every=0", f"max_steps={warmup + steps + 1}"]
    if "teacher" in recipe_class(recipe).roles:    # a random teacher of the student's size
        preset = load_train_config([base], overrides + extra).model_preset
        arch = {k.split(".", 1)[1]: int(v) for k, v in (o.split("=") for o in overrides)
                if k.startswith("model_overrides.")}
        save_random_dit(DiTConfig.preset(preset, **arch), tmp / "teacher", "cpu", torch.float32)
        extra.append(f"roles.teacher.init={tmp / 'teacher'}")
    cfg = load_train_config([base], overrides + extra)
    trainer = Trainer(cfg)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    Path("/proc/self/clear_refs").write_text("5")          # reset VmHWM (peak RSS) once the run is built
    built = _status_kib("VmRSS")
    for i in range(warmup + steps):
        if i == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        trainer.train_step()
        trainer.step += 1
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    out = {"steps_per_s": steps / seconds, "peak_mib": peak / 1024, "above_start_mib": (peak - built) / 1024}
    if device == "cuda":
        out["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def dit_pass_flops(cfg, batch: int, query_tokens: int, visible_pairs: int) -> float:
    """Forward model FLOPs of one DiT pass over `query_tokens` tokens per sample whose self-
    attention sees `visible_pairs` (query, key) token pairs per sample (the layout's count, the
    KV cache's keys included), per layer:
        linear layers  2 x tokens x (4 dim^2 [self q, k, v, o] + 2 dim^2 [cross q, o] + 2 dim ffn_dim)
        self-attention 4 x visible pairs x dim        (QK^T and PV)
        cross-attention 4 x tokens x text_len x dim
    times the layers and the batch. Left out (under 2% at the Wan-1.3B shape): the cross-
    attention K/V of the prompt, the patch embedding, the head, the time modulation and the norms."""
    d, layers = cfg.dim, cfg.num_layers
    per_token_linear = 2 * (6 * d * d + 2 * d * cfg.ffn_dim)
    per_layer = (query_tokens * per_token_linear + 4 * visible_pairs * d
                 + 4 * query_tokens * cfg.text_len * d)
    return float(batch * layers * per_layer)


BACKWARD_PASS_FACTOR = 2      # backward of a pass = 2x its forward (input and weight gradients)


class DiTFlops:
    """Model FLOPs of every pass of the given CausalDiTs while the block is active:
    `dit_pass_flops` of the pass's own layout, times 3 when its output carries gradients
    (forward + backward), times 1 otherwise. Gradient checkpointing's recomputation is not
    counted (model FLOPs, not hardware FLOPs). Reads each pass's layout from its first block's
    self-attention (the same layout serves every layer)."""

    def __init__(self, modules):
        self.modules, self.flops, self.passes, self._handles = list(modules), 0.0, 0, []

    def __enter__(self) -> "DiTFlops":
        for module in self.modules:
            state = {}

            def start(mod, args, state=state):
                state["layout"] = None

            def read_layout(mod, args, state=state):
                if state.get("layout", False) is None:      # first block call of this pass only
                    x, _, layout = args[:3]
                    state["layout"], state["batch"], state["tokens"] = layout, x.shape[0], x.shape[1]

            def finish(mod, args, out, state=state):
                layout = state.pop("layout", None)
                if layout is None:
                    return
                grad = isinstance(out, torch.Tensor) and out.requires_grad
                self.flops += (1 + BACKWARD_PASS_FACTOR * grad) * dit_pass_flops(
                    mod.config, state["batch"], state["tokens"], layout.visible_pairs())
                self.passes += 1

            self._handles += [module.register_forward_pre_hook(start),
                              module.blocks[0].self_attn.register_forward_pre_hook(read_layout),
                              module.register_forward_hook(finish)]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []


def save_random_dit(cfg, path: Path, device, dtype, seed: int = 0) -> Path:
    """A randomly initialised CausalDiT of `cfg` saved at `path` (initialised on `device`: a
    1.3B model takes seconds on a GPU and far longer on a CPU), stored in `dtype`."""
    from forcelab.models.dit import CausalDiT

    torch.manual_seed(seed)
    with torch.device(device):
        model = CausalDiT(cfg)
    model.set_dtype(dtype).to("cpu").save_pretrained(path)
    del model
    return path


def wan_step(args) -> None:
    """One Wan-1.3B training step (forward + backward + AdamW, bf16 autocast, gradient
    checkpointing on request) at the 480p training shape: time, model FLOPs utilisation and
    peak memory. FLOPs: 3 x dit_pass_flops over the block-causal layout (forward 1x,
    backward 2x)."""
    from forcelab.kernels import AttentionLayout
    from forcelab.models.config import DiTConfig
    from forcelab.models.dit import CausalDiT

    device = torch.device(args.device)
    cfg = DiTConfig.preset("wan2.1-t2v-1.3b", **({"num_layers": args.layers} if args.layers else {}))
    model = CausalDiT(cfg).to(device)
    model.gradient_checkpointing = args.checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    F, H, W = args.latent_frames, args.latent_height, args.latent_width
    x = torch.randn(1, cfg.in_channels, F, H, W, device=device)
    t = torch.full((1,), 500.0, device=device)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=device)
    per_frame = cfg.tokens_per_frame(H, W)
    tokens = F * per_frame
    layout = AttentionLayout.block_causal(F, per_frame, args.chunk)
    flops = (1 + BACKWARD_PASS_FACTOR) * dit_pass_flops(cfg, 1, tokens, layout.visible_pairs())
    peak = args.peak_tflops or (bf16_peak(device_name(device))[0] if device.type == "cuda" else None)
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(x, t, ctx, chunk_frames=args.chunk).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    print(f"Wan-1.3B step ({cfg.num_layers} layers, {F}x{H}x{W} latents = {tokens} tokens, chunk {args.chunk}, "
          f"checkpointing {'on' if args.checkpointing else 'off'}): {seconds * 1e3:.1f} ms, "
          f"{flops / seconds / 1e12:.1f} TFLOP/s model FLOPs"
          + (f", MFU {flops / seconds / 1e12 / peak:.1%} of {peak} TFLOP/s" if peak else ""))
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB on {torch.cuda.get_device_name()}")


def run_child(recipe: str, overrides: list[str], args) -> dict:
    cmd = [sys.executable, __file__, "--child", recipe, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--device", args.device, "--", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="*", help="recipes to measure (default: every one with a toy config)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--wan", action="store_true", help="one Wan-1.3B training step (MFU, peak memory)")
    p.add_argument("--layers", type=int, help="--wan: fewer layers (a CPU smoke run)")
    p.add_argument("--latent-frames", type=int, default=21)
    p.add_argument("--latent-height", type=int, default=60)
    p.add_argument("--latent-width", type=int, default=104)
    p.add_argument("--chunk", type=int, default=3, help="--wan: block-causal chunk (the causal student)")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="bf16 dense peak of the card (default: its datasheet figure, bench/card.py)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.wan:
        torch.set_num_threads(args.threads)
        wan_step(args)
        return
    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.child, args.overrides, args.steps, args.warmup, args.device)))
        return

    from forcelab.train.recipe import recipe_names
    names = args.recipes or [n for n in recipe_names() if (ROOT / "configs" / "toy" / f"{n}.yaml").exists()]
    print(f"toy recipes on {args.device}, {args.threads} thread(s), {args.steps} timed steps after {args.warmup}")
    print(f"{'recipe':20s} {'steps/s':>9s} {'peak MiB':>9s} {'training MiB':>13s}")
    for name in names:
        r = run_child(name, [], args)
        if "error" in r:
            print(f"{name:20s} error: {r['error']}")
            continue
        print(f"{name:20s} {r['steps_per_s']:9.2f} {r['peak_mib']:9.0f} {r['above_start_mib']:13.1f}")

    print(f"\ngradient checkpointing, teacher recipe at a larger toy size ({' '.join(LARGER_TOY)})")
    rows = {}
    for on in (False, True):
        rows[on] = run_child("teacher", LARGER_TOY + [f"roles.generator.gradient_checkpointing={str(on).lower()}"], args)
        r = rows[on]
        print(f"  checkpointing {'on ' if on else 'off'}: " + (f"error: {r['error']}" if "error" in r else
              f"{r['steps_per_s']:.2f} steps/s, peak {r['peak_mib']:.0f} MiB, {r['above_start_mib']:.1f} MiB for training"))
    if "error" not in rows[False] and "error" not in rows[True] and rows[False]["above_start_mib"] > 0:
        print(f"  training memory with / without: {rows[True]['above_start_mib'] / rows[False]['above_start_mib']:.2f}x; "
              f"speed with / without: {rows[True]['steps_per_s'] / rows[False]['steps_per_s']:.2f}x")


if __name__ == "__main__":
    main()
