"""Mutation testing: does the test suite notice when a recipe breaks one of its rules?

    python tests/mutations.py                       # every mutation, its own test files
    python tests/mutations.py --only dmd_real_fake_swapped ema_decay_inverted --jobs 2
    python tests/mutations.py --full --out mutations.md   # the whole suite for each mutation
    python tests/mutations.py --list                # the mutations (and a check that each applies)

Each mutation (tests/mutation_list.py) is ONE exact text replacement in one file of the package: a rule a recipe
states (its module docstring, after the paper and the public code), broken the way a plausible
bug would break it. The old snippet must occur exactly once in its file: when the
code moves on and a snippet no longer matches, the script stops before running anything and
names the mutation, so the list stays honest.

How a mutation is judged:
1. The package is copied to a temporary folder as `<tmp>/base/forcelab` (without .git, the
   virtual environment, runs and caches) and the copy's parent is put first on PYTHONPATH, so
   `import forcelab` loads the copy, not the editable install (checked in a subprocess), and
   pytest collects the copy's tests/.
2. Baseline: pytest runs every test file any selected mutation names, on the unmutated copy;
   the tests that pass are recorded. Tests that fail or error there are deselected from the
   mutation runs (so they can neither kill nor stop a run).
3. Per mutation: a fresh copy, the one replacement, pytest -x over the mutation's test files.
   The first failing test is the killer; the kill counts only if that test passed on the
   baseline and fails again when rerun alone on the mutant (a flaky failure is deselected and
   the run repeated). A mutation whose run ends with every test passing survived.

Output: a table (mutation, rule, recipe, result, killing test) and the kill rate, printed and,
with --out, written as JSON (.json) or markdown (any other suffix). Exit status 0 when every
mutation is killed, 1 when one survives or errs, 2 when the list does not apply.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mutation_list import INFRASTRUCTURE, MUTATIONS, REFERENCE, Mutation

ROOT = Path(__file__).resolve().parent.parent          # the package: its folder is `forcelab`
PACKAGE = "forcelab"
IGNORED = (".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", "runs",
           "outputs", "wandb", "build", "dist", "*.egg-info", ".whl", ".gl", "*.pyc")
PER_TEST_TIMEOUT = 240          # seconds; pytest-timeout turns a hang into a failing test
MAX_FLAKY_RERUNS = 2

# ---------------------------------------------------------------------- copies and runs
def copy_package(dest_parent: Path, source: Path = ROOT) -> Path:
    """Copy the package's working tree to dest_parent/forcelab (no git, venv, runs, caches)."""
    dest = dest_parent / PACKAGE
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(*IGNORED), symlinks=True)
    return dest


def check_mutation(m: Mutation, root: Path) -> str | None:
    """None when m applies to the package at root, else why not."""
    path = root / m.path
    if not path.is_file():
        return f"{m.path}: no such file"
    n = path.read_text().count(m.old)
    if n != 1:
        return f"{m.path}: the old snippet occurs {n} times (must be exactly once)"
    if m.old == m.new:
        return "old and new are the same"
    return None


def apply_mutation(m: Mutation, root: Path) -> None:
    path = root / m.path
    text = path.read_text()
    if text.count(m.old) != 1:
        raise RuntimeError(f"mutation {m.name}: {check_mutation(m, root)}")
    path.write_text(text.replace(m.old, m.new))


def environment(copy: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    env.update(PYTHONPATH=str(copy.parent), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1", WANDB_MODE="disabled", PYTHONHASHSEED="0")
    return env


def check_import(copy: Path) -> None:
    """`import forcelab` in a subprocess with the run's environment must load the copy."""
    out = subprocess.run([sys.executable, "-c", "import forcelab; print(forcelab.__file__)"], cwd=copy,
                         env=environment(copy), capture_output=True, text=True, timeout=300)
    loaded = Path(out.stdout.strip() or "?").resolve()
    if out.returncode != 0 or loaded.parent != copy.resolve():
        raise SystemExit(f"mutations: `import forcelab` in the copy loads {loaded}, not {copy} "
                         f"(rc {out.returncode}): {out.stderr[-2000:]}")


def resolve_tests(patterns: tuple[str, ...], copy: Path) -> list[str]:
    """Globs -> existing test files relative to the copy, in order, without repeats."""
    out = []
    for pattern in patterns:
        for f in sorted(glob.glob(str(copy / pattern))):
            rel = str(Path(f).relative_to(copy))
            if rel not in out:
                out.append(rel)
    return out


SUMMARY = re.compile(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S.*?)(?: - .*)?$")


def pytest(copy: Path, args: list[str], timeout: float, basetemp: Path) -> tuple[int, dict[str, list[str]], str, bool]:
    """Run pytest in the copy -> (rc, {outcome: [node ids in order]}, output tail, timed out)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEsp", "-o",
           f"timeout={PER_TEST_TIMEOUT}", f"--basetemp={basetemp}", *args]
    try:
        out = subprocess.run(cmd, cwd=copy, env=environment(copy), capture_output=True, text=True, timeout=timeout)
        text, rc, timed_out = out.stdout + out.stderr, out.returncode, False
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, timed_out = -1, True
    outcomes: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = SUMMARY.match(line.strip())
        if match:
            outcomes.setdefault(match.group(1), []).append(match.group(2).strip())
    return rc, outcomes, text[-3000:], timed_out


@dataclass
class Result:
    name: str
    recipe: str
    rule: str
    status: str                         # killed | survived | error | timeout
    killer: str | None = None
    seconds: float = 0.0
    tests: list[str] = field(default_factory=list)
    note: str = ""


def run_mutation(m: Mutation, base: Path, work: Path, files: list[str], baseline_pass: set[str],
                 baseline_bad: list[str], timeout: float, select: list[str]) -> Result:
    t0 = time.perf_counter()
    result = Result(m.name, m.recipe, m.rule, "error", tests=files)
    folder = Path(tempfile.mkdtemp(prefix=f"{m.name}-", dir=work))
    try:
        copy = copy_package(folder, base)
        apply_mutation(m, copy)
        deselect = [f"--deselect={t}" for t in baseline_bad if t.split("::")[0] in files]
        flaky: list[str] = []
        for _ in range(MAX_FLAKY_RERUNS + 1):
            args = ["-x", *select, *deselect, *[f"--deselect={t}" for t in flaky], *files]
            rc, outcomes, tail, timed_out = pytest(copy, args, timeout, folder / "tmp")
            failed = outcomes.get("FAILED", []) + outcomes.get("ERROR", [])
            if timed_out:
                result.status, result.note = "timeout", f"no result within {timeout:.0f} s"
                break
            if not failed:
                if rc in (0, 5):
                    result.status = "survived"
                else:
                    result.status, result.note = "error", f"pytest exit {rc} without a failing test: {tail[-500:]}"
                break
            killer = failed[0]
            if killer not in baseline_pass:
                result.status, result.killer = "error", killer
                result.note = ("first failure is not a test that passed on the baseline (collection error?): "
                               + tail[-800:])
                break
            _, again, _, _ = pytest(copy, [killer], timeout, folder / "tmp")
            if killer in again.get("FAILED", []) + again.get("ERROR", []):
                result.status, result.killer = "killed", killer
                break
            flaky.append(killer)
            result.note = f"flaky under the mutant (failed, then passed alone): {', '.join(flaky)}"
        else:
            result.note += "; gave up after reruns"
    except Exception as e:   # report, never stop the other mutations
        result.status, result.note = "error", f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result.seconds = round(time.perf_counter() - t0, 1)
    return result


def run_baseline(base: Path, files: list[str], jobs: int, timeout: float, work: Path,
                 select: list[str]) -> tuple[set[str], list[str], float]:
    """Run the files on the unmutated copy (split over jobs) -> (passing ids, failing ids, seconds)."""
    t0 = time.perf_counter()
    shards = [files[i::jobs] for i in range(jobs) if files[i::jobs]]

    def one(i_shard):
        i, shard = i_shard
        return pytest(base, [*select, *shard], timeout * 4, work / f"baseline-{i}")

    with ThreadPoolExecutor(len(shards)) as pool:
        results = list(pool.map(one, enumerate(shards)))
    passed, bad = set(), []
    for rc, outcomes, tail, timed_out in results:
        if timed_out:
            raise SystemExit(f"mutations: the baseline run timed out: {tail}")
        passed.update(outcomes.get("PASSED", []))
        bad += outcomes.get("FAILED", []) + outcomes.get("ERROR", [])
        if rc not in (0, 1) or (rc == 1 and not bad):
            raise SystemExit(f"mutations: the baseline run failed to run (pytest exit {rc}):\n{tail}")
    return passed, bad, time.perf_counter() - t0


# ---------------------------------------------------------------------- report
def table(results: list[Result]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    rows = ["| mutation | rule | recipe | result | killing test |", "|---|---|---|---|---|"]
    for r in results:
        killer = f"`{r.killer}`" if r.killer else (r.note[:120] if r.status != "survived" else "")
        rows.append(f"| `{r.name}` | {cell(r.rule)} | {cell(r.recipe)} | {r.status} | {cell(killer)} |")
    return "\n".join(rows)


def summary(results: list[Result], seconds: float, baseline_seconds: float, full: bool) -> dict:
    killed = sum(r.status == "killed" for r in results)
    return {"mutations": len(results), "killed": killed,
            "kill_rate": round(killed / len(results), 4) if results else None,
            "survived": [r.name for r in results if r.status == "survived"],
            "not_judged": [f"{r.name} ({r.status})" for r in results if r.status not in ("killed", "survived")],
            "seconds": round(seconds, 1), "baseline_seconds": round(baseline_seconds, 1),
            "tests": "whole suite" if full else "per-mutation files"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    p.add_argument("--jobs", type=int, default=1, help="mutations run in parallel (default 1)")
    p.add_argument("--out", type=Path, help="write the results: .json, or markdown for any other suffix")
    p.add_argument("--full", action="store_true", help="run the whole test suite for every mutation")
    p.add_argument("--timeout", type=float, default=900, help="seconds per mutation run (default 900)")
    p.add_argument("--list", action="store_true", help="list the mutations, check they apply, and stop")
    a = p.parse_args(argv)

    names = [m.name for m in MUTATIONS]
    if len(set(names)) != len(names):
        raise SystemExit("mutations: two mutations share a name")
    chosen = MUTATIONS
    if a.only:
        unknown = sorted(set(a.only) - set(names))
        if unknown:
            raise SystemExit(f"mutations: unknown mutation(s) {unknown}; --list shows them")
        chosen = [m for m in MUTATIONS if m.name in a.only]
    bad = [(m.name, why) for m in chosen if (why := check_mutation(m, ROOT))]
    if bad:
        print("mutations that do not apply to the code as it is (fix the list):", file=sys.stderr)
        for name, why in bad:
            print(f"  {name}: {why}", file=sys.stderr)
        return 2
    if a.list:
        for m in chosen:
            print(f"{m.name:45s} {m.recipe:32s} {m.rule}")
        print(f"{len(chosen)} mutations, all apply")
        return 0

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="forcelab-mutations-"))
    try:
        base = copy_package(work / "base")
        check_import(base)
        files_of = {}
        for m in chosen:
            files_of[m.name] = resolve_tests(("tests/test_*.py",) if a.full else m.tests + REFERENCE, base)
            if not a.full and files_of[m.name] == resolve_tests(REFERENCE, base):
                raise SystemExit(f"mutations: {m.name}: none of its own test files exist ({m.tests})")
            if not files_of[m.name]:
                raise SystemExit(f"mutations: {m.name}: none of its test files exist ({m.tests})")
        union = []
        for m in chosen:
            union += [f for f in files_of[m.name] if f not in union]
        print(f"baseline: {len(union)} test files on the unmutated copy ...", flush=True)
        select = [] if a.full else ["-k", INFRASTRUCTURE]
        passed, failing, base_s = run_baseline(base, union, max(1, a.jobs), a.timeout, work, select)
        print(f"baseline: {len(passed)} passed, {len(failing)} failed (deselected in the mutation runs) "
              f"in {base_s:.0f} s" + (f": {failing}" if failing else ""), flush=True)

        def one(m):
            r = run_mutation(m, base, work, files_of[m.name], passed, failing, a.timeout, select)
            print(f"  {r.status:8s} {r.name} ({r.seconds:.0f} s){': ' + r.killer if r.killer else ''}"
                  f"{' - ' + r.note[:300] if r.note and r.status != 'killed' else ''}", flush=True)
            return r

        with ThreadPoolExecutor(max(1, a.jobs)) as pool:
            results = list(pool.map(one, chosen))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = summary(results, time.perf_counter() - t0, base_s, a.full)
    text = (f"{table(results)}\n\nkilled {info['killed']} of {info['mutations']} "
            f"({100 * (info['kill_rate'] or 0):.1f}%); survived: {', '.join(info['survived']) or 'none'}; "
            f"not judged: {', '.join(info['not_judged']) or 'none'}; {info['seconds']:.0f} s in all "
            f"(baseline {info['baseline_seconds']:.0f} s)\n")
    print("\n" + text)
    if a.out:
        if a.out.suffix == ".json":
            a.out.write_text(json.dumps({"summary": info, "results": [asdict(r) for r in results]}, indent=2) + "\n")
        else:
            a.out.write_text(text)
    return 0 if info["killed"] == info["mutations"] else 1


if __name__ == "__main__":
    sys.exit(main())
