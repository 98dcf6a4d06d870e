"""Start-up time of the console script: this checkout against another one, interleaved.

    python bench/startup.py --base OTHER_CHECKOUT       # another checkout (or the folder holding one)
    python bench/startup.py                             # this checkout alone

Each round runs, for each checkout in turn (A B A B ...: machine load hits both alike), in a
fresh interpreter with PYTHONPATH pointing at that checkout's parent folder:
    help   `python -m forcelab generate --help`, wall time to exit;
    first  `python -m forcelab generate` on the committed toy teacher (configs/toy/teacher_checkpoint,
           --frames 8, CPU), wall time from the process start to its first progress line on stderr
           (printed when the first chunk's frames are done: the time to the first frame);
    run    the same run's wall time to exit (mp4 written).
Each is timed twice: wall clock, and the child's CPU time (user + system; at the first
progress line read from /proc/PID/stat, in clock ticks), which waiting for a shared machine's
cores does not inflate. Prints min and median over --rounds rounds per checkout and the
ratios base / this.
The children run with OMP_NUM_THREADS=1 (torch's threads, the same for both) in an empty
working folder: `python -m` puts the working folder first on sys.path, which would otherwise
shadow PYTHONPATH when run from a checkout's parent.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THIS = Path(__file__).resolve().parents[1]             # this checkout (the package folder)
TEACHER = Path(__file__).resolve().parents[1] / "configs" / "toy" / "teacher_checkpoint"
FRAMES = 8                      # video frames of the timed run: 4 chunks of the toy teacher
PROGRESS_PREFIX = "generate: "  # generate's progress line (progress.LineProgress) when stderr is no terminal
MEASURES = ("help", "first", "run")
CLOCKS = ("wall", "cpu")
TICK = 1 / os.sysconf("SC_CLK_TCK")     # seconds per /proc CPU-time tick


def child_env(parent: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(parent), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def run_child(cmd: list[str], parent: Path, cwd: str, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """A child importing forcelab from `parent`, started in `cwd` (an empty folder)."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=child_env(parent), cwd=cwd)


def reap(proc: subprocess.Popen) -> tuple[int, float]:
    """(exit status, CPU seconds: user + system) of a finished child."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def cpu_so_far(pid: int) -> float:
    """CPU seconds (user + system) a running process has used, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK     # utime, stime (fields 14, 15 of stat)


def where(parent: Path) -> str:
    """The forcelab package a child with this PYTHONPATH imports (a check that it is the right one)."""
    with tempfile.TemporaryDirectory() as cwd:
        proc = run_child([sys.executable, "-c", "import forcelab; print(forcelab.__file__)"], parent, cwd)
        out = proc.stdout.read().strip()
        reap(proc)
    return out


def time_help(parent: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of `generate --help`."""
    with tempfile.TemporaryDirectory() as cwd:
        t0 = time.perf_counter()
        proc = run_child([sys.executable, "-m", "forcelab", "generate", "--help"], parent, cwd)
        proc.stdout.read()
        status, cpu = reap(proc)
        wall = time.perf_counter() - t0
    if status:
        raise SystemExit(f"generate --help failed under PYTHONPATH={parent}")
    return wall, cpu


def time_generate(parent: Path) -> tuple[tuple[float, float], tuple[float, float]]:
    """((wall, CPU) to the first progress line, (wall, CPU) to exit) of one toy generate run."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "forcelab", "generate", str(TEACHER), "--prompt", "a red ball",
               "--frames", str(FRAMES), "--device", "cpu", "--output", str(Path(tmp) / "videos")]
        t0 = time.perf_counter()
        proc = run_child(cmd, parent, tmp, stderr=subprocess.PIPE)
        first, lines = None, []
        for line in proc.stderr:
            lines.append(line)
            if first is None and line.startswith(PROGRESS_PREFIX):
                first = (time.perf_counter() - t0, cpu_so_far(proc.pid))
        proc.stdout.read()
        status, cpu = reap(proc)
        total = (time.perf_counter() - t0, cpu)
    if status or first is None:
        raise SystemExit(f"generate failed under PYTHONPATH={parent}:\n{''.join(lines)[-3000:]}")
    return first, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=None, help="another forcelab checkout (or the folder holding one)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    from forcelab.bench.versus import package_parent   # a folder to put on PYTHONPATH for a checkout
    links = Path(tempfile.mkdtemp(prefix="startup-"))
    this = package_parent(THIS, links)
    contenders = {"this": this} if args.base is None else {"base": package_parent(args.base, links), "this": this}
    for name, parent in contenders.items():
        print(f"{name}: {where(parent)}")
    print(f"python {sys.version.split()[0]}, OMP_NUM_THREADS=1, {args.rounds} interleaved rounds, "
          f"generate: toy teacher, {FRAMES} frames, CPU")
    times = {name: {(m, c): [] for m in MEASURES for c in CLOCKS} for name in contenders}
    for _ in range(args.rounds):
        for name, parent in contenders.items():
            measured = dict(zip(MEASURES, (time_help(parent), *time_generate(parent))))
            for m, values in measured.items():
                for c, value in zip(CLOCKS, values):
                    times[name][(m, c)].append(value)
    labels = {"help": "generate --help", "first": "to first frame", "run": "whole run"}
    print(f"{'seconds':24s}" + "".join(f"{name + ' min':>11s}{name + ' median':>14s}" for name in contenders)
          + ("   base/this min  base/this median" if len(contenders) == 2 else ""))
    for m in MEASURES:
        for c in CLOCKS:
            row = f"{labels[m] + ', ' + c:24s}"
            for name in contenders:
                row += f"{min(times[name][(m, c)]):11.3f}{statistics.median(times[name][(m, c)]):14.3f}"
            if len(contenders) == 2:
                b, t = times["base"][(m, c)], times["this"][(m, c)]
                row += f"{min(b) / min(t):16.2f}{statistics.median(b) / statistics.median(t):18.2f}"
            print(row)

if __name__ == "__main__":
    main()
