"""The parts of the GPU check and their settings: full (the Wan-1.3B shapes) and smoke (tiny
shapes that run end to end on a CPU in seconds). Each part fills a `Record` (runner.py) and
saves it after every measurement, so a part stopped at its budget keeps what it measured.
The measurements themselves are the benchmarks' own functions (bench/attention.py,
bench/streaming.py, bench/distill.py); this module only chooses shapes and records.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]          # the repository (the forcelab package)
GPU_MARK = "pytest.mark.gpu"
PYTEST_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed|warnings?)")
PYTEST_LOG = "gpu_check_pytest.log"
PYTEST_MARGIN_S = 5          # the pytest process must end this long before its part's budget


@dataclass
class Settings:
    """Shapes and budgets of one check (`settings(smoke)` gives the two kinds)."""
    smoke: bool
    budgets_s: dict[str, float]                 # part -> seconds
    attention_tokens_per_frame: int
    attention_warmup_ms: int
    attention_rep_ms: int
    attention_flex: bool
    dit_arch: dict = field(default_factory=dict)    # overrides of the Wan-1.3B preset ({}: the real size)
    height: int = 480
    width: int = 832
    stream_latent_frames: int = 21
    stream_repeats: int = 2
    vae_kwargs: dict | None = None              # AutoencoderKLWan arguments (None: Wan2.1's VAE)
    train_warmup: int = 1
    train_steps: int = 1
    pytest_args: list[str] = field(default_factory=list)


# Full budgets add up to 8 minutes: the attention and training parts compile kernels (Triton,
# FlexAttention) in their first calls, and the training part builds three 1.3B models.
FULL_BUDGETS_S = {"tests": 90, "attention": 150, "streaming": 90, "training": 150}
SMOKE_BUDGETS_S = {"tests": 60, "attention": 30, "streaming": 60, "training": 30}   # a shared CPU
# Wan2.1 in miniature for --smoke: the preset's architecture at test width and depth
TINY_ARCH = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=1, text_dim=32, text_len=16)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
SMOKE_PIXELS = 64            # 64 x 64 frames -> 8 x 8 latents -> 16 tokens per frame
SMOKE_STREAM_FRAMES = 3      # one chunk
SMOKE_TOKENS_PER_FRAME = 8   # attention: 21 frames x 8 tokens


def settings(smoke: bool) -> Settings:
    if not smoke:
        from forcelab.bench.attention import WAN_TOKENS_PER_FRAME
        return Settings(False, dict(FULL_BUDGETS_S), WAN_TOKENS_PER_FRAME, attention_warmup_ms=25,
                        attention_rep_ms=100, attention_flex=True)
    return Settings(True, dict(SMOKE_BUDGETS_S), SMOKE_TOKENS_PER_FRAME, attention_warmup_ms=25,
                    attention_rep_ms=150, attention_flex=False, dit_arch=dict(TINY_ARCH),
                    height=SMOKE_PIXELS, width=SMOKE_PIXELS, stream_latent_frames=SMOKE_STREAM_FRAMES,
                    stream_repeats=1, vae_kwargs=dict(TINY_VAE))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def peak(dev: torch.device) -> float | None:
    from forcelab.bench.card import bf16_peak, device_name
    return bf16_peak(device_name(dev))[0] if dev.type == "cuda" else None


# ---------------------------------------------------------------------------- tests
def gpu_test_files(root: Path = ROOT) -> list[str]:
    """The test files that hold gpu-marked tests (collecting only these keeps a missing optional
    package of another test file from stopping the run)."""
    return sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py")
                  if GPU_MARK in p.read_text(encoding="utf-8"))


def pytest_counts(output: str) -> dict[str, int]:
    """{"passed": n, "failed": n, ...} from pytest's last summary line."""
    lines = [line for line in output.strip().splitlines() if PYTEST_COUNTS.search(line)]
    if not lines:
        return {}
    counts = {}
    for n, what in PYTEST_COUNTS.findall(lines[-1]):
        key = {"error": "errors", "warning": "warnings"}.get(what, what)
        counts[key] = counts.get(key, 0) + int(n)
    return counts


def tests_part(s: Settings, record, deadline: float, progress) -> None:
    files = gpu_test_files()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rfEs", "--durations=5",
           *files, *s.pytest_args]
    record.data.update(files=files, command=" ".join(cmd[1:]))
    progress(f"pytest -m gpu over {len(files)} files")
    limit = max(1.0, deadline - time.monotonic() - PYTEST_MARGIN_S)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        code = f"timed out after {limit:.0f} s"
    if record.out_dir is not None:
        (record.out_dir / PYTEST_LOG).write_text(output, encoding="utf-8")
    record.data.update(returncode=code, counts=pytest_counts(output), log=PYTEST_LOG,
                       failed=[line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))])
    summary = output.strip().splitlines()[-1] if output.strip() else "no output"
    record.data["summary"] = summary
    progress(summary)
    record.save()


# ---------------------------------------------------------------------------- attention
def attention_part(s: Settings, record, deadline: float, progress) -> None:
    from forcelab.bench.attention import measure_shape, shapes

    dev = device()
    record.data.update(tokens_per_frame=s.attention_tokens_per_frame, peak_tflops=peak(dev),
                       shapes={}, flop_formula="forward 4 x visible pairs x head_dim x heads x batch; "
                                               "backward 2.5x forward")
    for name, layout in shapes(s.attention_tokens_per_frame).items():
        if time.monotonic() > deadline:
            record.data["shapes"][name] = {"status": "skipped: the part's time budget is spent"}
            continue
        progress(f"{name}: {layout.num_queries} queries x {layout.num_keys} keys")

        def saved(line: str, name=name) -> None:      # after every method: a stop keeps what was measured
            progress(f"{name}: {line}")
            record.save()
        into = record.data["shapes"][name] = {}
        try:
            measure_shape(layout, dev, torch.bfloat16, warmup=s.attention_warmup_ms, rep=s.attention_rep_ms,
                          with_flex=s.attention_flex, peak_tflops=peak(dev), deadline=deadline, progress=saved,
                          into=into)
        except Exception as e:                         # this shape only: the next may still run
            into["status"] = f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            progress(f"{name}: {into['status']}")
        record.save()


# ---------------------------------------------------------------------------- streaming
def streaming_part(s: Settings, record, deadline: float, progress) -> None:
    from forcelab.bench.streaming import wan_fps
    from forcelab.models.config import DiTConfig

    dev = device()
    cfg = DiTConfig.preset("wan2.1-t2v-1.3b", chunk_frames=3, **s.dit_arch)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    progress(f"{cfg.num_layers} layers, dim {cfg.dim}, {s.height}x{s.width}, {s.stream_latent_frames} latent frames")
    record.data.update(wan_fps(cfg, s.height, s.width, s.stream_latent_frames, s.stream_repeats, dev, dtype,
                               vae_kwargs=s.vae_kwargs))
    vae = record.data["vae"]
    progress(f"DiT alone {record.data['dit_fps']:.1f} FPS; with VAE decode: "
             + (f"{vae['fps']:.1f} FPS" if isinstance(vae, dict) else vae))
    record.save()


# ---------------------------------------------------------------------------- training
def training_part(s: Settings, record, deadline: float, progress) -> None:
    from forcelab.bench.distill import wan_self_forcing_step

    dev = device()
    record.data.update(wan_self_forcing_step(s.dit_arch, s.height, s.width, dev, warmup=s.train_warmup,
                                             steps=s.train_steps, peak_tflops=peak(dev), progress=progress))
    if dev.type == "cuda":
        record.data["peak_tflops"] = peak(dev)
    record.save()


PARTS = {"tests": tests_part, "attention": attention_part, "streaming": streaming_part,
         "training": training_part}
