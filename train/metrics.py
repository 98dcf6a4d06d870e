"""Rank-0 logging: every metric to run_dir/metrics.jsonl, console lines, progress, wandb and,
with `logging.tensorboard`, TensorBoard event files in run_dir/tensorboard (`tensorboard --logdir`).

wandb runs offline unless the config or WANDB_MODE says otherwise, and never blocks or
fails a run: if it cannot start, the run goes on without it (and says so once). TensorBoard is
asked for explicitly, so without the tensorboard package the run refuses to start (one line).
metrics.jsonl is appended through fsio.append_text: a link out of the run folder is refused
(checked when the logger starts, before any step, and at every write).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from ..errors import ForcelabError
from ..fsio import append_text, os_error_message, own_file
from ..progress import progress_bar


TENSORBOARD_DIR = "tensorboard"


def read_scalars(total, norm, finite, logs: dict) -> tuple[float, float, float, dict[str, float]]:
    """Host floats of an update's loss, gradient norm, finite flag and logs (0-d tensors or
    floats), in ONE device-to-host copy: a float() per value would synchronise a GPU each time."""
    names = [k for k, v in logs.items() if torch.is_tensor(v)]
    tensors = [total, norm, finite] + [logs[k] for k in names]
    device = next((t.device for t in tensors if torch.is_tensor(t)), torch.device("cpu"))
    stacked = torch.stack([torch.as_tensor(t, device=device).detach().double().reshape(()) for t in tensors])
    values = stacked.cpu().tolist()
    read = iter(values[3:])
    return values[0], values[1], values[2], {k: next(read) if torch.is_tensor(v) else v for k, v in logs.items()}


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg, enabled: bool, config_dict: dict, start_step: int):
        self.enabled, self.every = enabled, cfg.logging.every
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        self.tensorboard = None
        self.bar = None
        self._t0, self._s0 = time.perf_counter(), start_step
        self.latest: dict[str, tuple[float, int]] = {}   # every role's latest loss: (value, step)
        if not enabled:
            return
        own_file(self.path, "metrics")
        mode = os.environ.get("WANDB_MODE") or cfg.logging.wandb
        if mode != "disabled":
            self.wandb = _start_wandb(mode, cfg.logging.project, Path(run_dir), config_dict)
            if self.wandb is not None and mode == "offline":
                print(f"wandb: offline; to upload: wandb sync {Path(self.wandb.dir).parent}",
                      file=sys.stderr, flush=True)
        if cfg.logging.tensorboard:
            self.tensorboard = _start_tensorboard(Path(run_dir) / TENSORBOARD_DIR, start_step)
            print(f"tensorboard: tensorboard --logdir {Path(run_dir) / TENSORBOARD_DIR}", file=sys.stderr, flush=True)
        if cfg.logging.progress:
            self.bar = progress_bar(total=cfg.max_steps, initial=start_step, desc=cfg.recipe, unit="step")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.latest.update({k: (v, step) for k, v in metrics.items() if k.endswith("loss")})
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self._t0
        rate = (step - self._s0) / elapsed if elapsed > 0 else 0.0
        record = {"step": step, "time": round(elapsed, 3), "steps_per_s": round(rate, 4), **metrics}
        try:
            append_text(self.path, json.dumps(record) + "\n", "metrics")
        except OSError as e:
            raise ForcelabError(os_error_message(e, "metrics", self.path)) from None
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, (v, _) in self.latest.items()}, refresh=False)
            self.bar.update(1)
        if step % self.every == 0:
            # roles update at different rates (Self-Forcing: the generator every 5th step): every
            # line shows every role's latest loss, with its step when that was not this one
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            older = " ".join(f"{k}={v:.4g} (step {s})" for k, (v, s) in self.latest.items() if k not in metrics)
            self.write(f"step {step}: {' '.join(t for t in (text, older) if t)} ({rate:.2f} steps/s)")
        if self.tensorboard is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tensorboard.add_scalar(k, v, global_step=step)
        if self.wandb is not None:
            try:
                self.wandb.log(metrics, step=step)
            except Exception as e:  # never fail a run for its logging
                self.write(f"wandb: logging stopped ({type(e).__name__}: {e})")
                self.wandb = None

    def log_video(self, step: int, name: str, path: Path, caption: str | None = None) -> None:
        if self.enabled and self.wandb is not None:
            try:
                import wandb
                self.wandb.log({name: wandb.Video(str(path), caption=caption)}, step=step)
            except Exception:
                pass

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:
                pass
            self.wandb = None


def _start_tensorboard(folder: Path, start_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ForcelabError("logging.tensorboard=true needs the tensorboard package: pip install tensorboard "
                            "(or set logging.tensorboard=false)") from None
    own_file(folder, "tensorboard")
    # a resumed run drops what an earlier process wrote past its checkpoint (TensorBoard's purge)
    return SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)


def _start_wandb(mode: str, project: str, run_dir: Path, config: dict):
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb
        return wandb.init(project=project, dir=str(run_dir), mode=mode, config=config,
                          name=run_dir.name, settings=wandb.Settings(init_timeout=30))
    except Exception as e:
        print(f"wandb: not logging ({type(e).__name__}: {e}); metrics are in {run_dir / 'metrics.jsonl'}",
              file=sys.stderr)
        return None
