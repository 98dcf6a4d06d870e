"""Runs the parts within the budgets and keeps every outcome.

Each part runs in a child process (`python -m forcelab.bench.gpu_check --child PART`) that
saves its record to a JSON file after every measurement; the parent waits at most the part's
budget (or what is left of the overall budget), then stops the child's whole process group
and keeps the record as saved. A hang, a crash or an out-of-memory in one part costs that
part only, and each part starts with the GPU's memory free. `in_process=True` calls the parts
directly (the test suite's smoke run): the budgets then only decide what starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from . import parts as check_parts
from .report import REPORT_JSON, REPORT_MD, write_report

MIN_PART_S = 10              # a part is not started with less than this left of the overall budget
OVERALL_BUDGET_S = 480       # 8 minutes
CHILD_EXIT_GRACE_S = 5       # past its budget a child has this long to save and end, then it is killed
TUNING_JSON = "attention_tuning.json"
SMOKE_LABEL = "SMOKE RUN: tiny shapes, a check that every part runs, not a measurement of anything"


class Record:
    """One part's results: a dict saved (atomically) to `path` whenever the part says so."""

    def __init__(self, path: Path | None, out_dir: Path | None):
        self.path, self.out_dir, self.data = path, out_dir, {}

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str), encoding="utf-8")
        os.replace(tmp, self.path)


def forcelab_location() -> str:
    """Where the forcelab package this check imports lives (the checkout it measures)."""
    import forcelab
    return str(Path(forcelab.__file__).parent)


def child_env(out: Path) -> dict:
    """The parts' environment: the attention kernels' autotuning results go to the report folder
    (which configs won on this card), unless a tuning file is set already."""
    from forcelab.kernels.dispatch import triton_installed

    env = dict(os.environ)
    if triton_installed():
        from forcelab.kernels.triton_configs import TUNING_FILE_ENV
        env.setdefault(TUNING_FILE_ENV, str(out.resolve() / TUNING_JSON))
    return env


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def progress_printer(t0: float, part: str):
    def progress(message: str) -> None:
        print(f"[{time.time() - t0:7.1f} s] {part}: {message}", flush=True)
    return progress


def run_part_here(name: str, settings, record: Record, deadline: float, progress) -> str:
    """Run one part in this process; its status ("ok" or the one-line error)."""
    try:
        check_parts.PARTS[name](settings, record, deadline, progress)
    except Exception as e:           # record it and go on: one bug must not lose the others
        record.data["traceback"] = traceback.format_exc(limit=-8)
        progress(f"failed: {one_line(e)}")
        return f"error: {one_line(e)}"
    return "ok"


def run_child(cmd: list[str], result: Path, limit: float, grace: float = CHILD_EXIT_GRACE_S,
              env: dict | None = None) -> tuple[str, dict]:
    """Run `cmd` in a new process group for at most `limit` + `grace` seconds, then kill the
    group: (its status, the record the child saved at `result`)."""
    result.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)    # its own group: killed with its children
    status = None
    try:
        code = proc.wait(timeout=limit + grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = f"timed out: stopped after its {limit:.0f} s budget (what it had measured is kept)"
    data = json.loads(result.read_text(encoding="utf-8")) if result.is_file() else {}
    result.unlink(missing_ok=True)
    if status is None:
        status = data.pop("_status", None) or f"error: the part's process exited with code {code}"
    data.pop("_status", None)
    return status, data


def run_part_child(name: str, smoke: bool, out: Path, limit: float, t0: float, pytest_args) -> tuple[str, dict]:
    """Run one part in a child process for at most `limit` seconds: (status, its record)."""
    cmd = [sys.executable, "-m", "forcelab.bench.gpu_check", "--child", name, "--out", str(out),
           "--t0", repr(t0), "--budget", repr(limit)]
    if smoke:
        cmd.append("--smoke")
    cmd += [f"--pytest-arg={a}" for a in pytest_args]
    return run_child(cmd, out / f".part_{name}.json", limit, env=child_env(out))


def child_main(name: str, smoke: bool, out: Path, t0: float, budget: float, pytest_args) -> int:
    """The child's side: run the part, save its record with its status."""
    settings = check_parts.settings(smoke)
    settings.pytest_args = list(pytest_args)
    record = Record(out / f".part_{name}.json", out)
    progress = progress_printer(t0, name)
    status = run_part_here(name, settings, record, time.monotonic() + budget, progress)
    record.data["_status"] = status
    record.save()
    return 0


def run_check(out: Path, smoke: bool = False, budget_s: float = OVERALL_BUDGET_S, parts=None,
              in_process: bool = False, pytest_args=()) -> dict:
    """Every part (or those named) within `budget_s` seconds; writes and returns the report."""
    from forcelab.bench.card import describe

    t0, start = time.time(), time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = check_parts.settings(smoke)
    settings.pytest_args = list(pytest_args)
    names = list(parts or check_parts.PARTS)
    report = {"smoke": smoke, "label": SMOKE_LABEL if smoke else "full check",
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "budget_s": budget_s, "environment": {**describe(check_parts.device()),
                                                    "forcelab": forcelab_location()},
              "settings": asdict(settings), "parts": {}}
    main_progress = progress_printer(t0, "check")
    env = report["environment"]
    main_progress(f"{env['device']}, torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}; "
                  f"parts {names}, budget {budget_s:.0f} s" + (" (SMOKE)" if smoke else ""))
    for name in names:
        if name not in check_parts.PARTS:
            report["parts"][name] = {"status": f"skipped: unknown part; parts are {list(check_parts.PARTS)}"}
            continue
        left = budget_s - (time.monotonic() - start)
        limit = min(settings.budgets_s[name], left)
        if limit < MIN_PART_S:
            report["parts"][name] = {"status": f"skipped: {max(left, 0):.0f} s left of the overall "
                                               f"{budget_s:.0f} s budget (a part needs {MIN_PART_S} s)"}
            main_progress(f"{name} {report['parts'][name]['status']}")
            write_report(report, out)
            continue
        main_progress(f"{name}: start (budget {limit:.0f} s)")
        part_start = time.monotonic()
        if in_process:
            record = Record(None, out)
            status = run_part_here(name, settings, record, time.monotonic() + limit,
                                   progress_printer(t0, name))
            data = record.data
        else:
            status, data = run_part_child(name, smoke, out, limit, t0, settings.pytest_args)
        seconds = time.monotonic() - part_start
        report["parts"][name] = {"status": status, "seconds": round(seconds, 1), "budget_s": limit, **data}
        main_progress(f"{name}: {status} in {seconds:.1f} s")
        write_report(report, out)         # after every part: a run cut short keeps the parts done
    report["elapsed_s"] = round(time.monotonic() - start, 1)
    write_report(report, out)
    main_progress(f"done in {report['elapsed_s']} s: {out / REPORT_JSON}, {out / REPORT_MD}")
    return report
