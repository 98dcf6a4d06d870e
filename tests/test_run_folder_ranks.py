"""The run folder under several processes: rank 0 alone looks at it and makes it, the other
ranks learn its verdict, so no rank ever judges a folder another rank is still writing.

The race this pins: rank 0 makes the folder, writes the marker, then the run record; a rank
that looked between the marker and the record saw a non-empty folder without a record and
stopped ("exists and was not written by forcelab"). The launch below holds rank 0 in that gap
and lets rank 1 look exactly then."""

import os
import subprocess
import sys

from forcelab.fsio import MARKER
from forcelab.run_folder import RUN_RECORD

TINY = ["recipe=teacher", "model_overrides.dim=32", "model_overrides.ffn_dim=64", "model_overrides.num_layers=1",
        "model_overrides.num_heads=2", "data.frames=4", "data.batch_size=1", "logging.wandb=disabled",
        "logging.progress=false"]

# rank 0 sleeps between the marker and the run record; rank 1 enters the run-folder step only
# once the marker exists, i.e. inside that gap (test-side patches, no production hook)
GAP_SCRIPT = """
import sys, time
from pathlib import Path
import forcelab.train.trainer as T
from forcelab.train.config import load_train_config

run, gap = Path(sys.argv[1]), sys.argv[2] == "gap"
real_mark, real_prepare = T.mark, T.Trainer._prepare_run_dir

def slow_mark(d, *args, **kwargs):
    real_mark(d, *args, **kwargs)
    time.sleep(1.0)

def prepare_in_the_gap(self, resume):
    if self.rank and gap:
        while not (run / "MARKER").exists():
            time.sleep(0.01)
    real_prepare(self, resume)

T.mark = slow_mark
T.Trainer._prepare_run_dir = prepare_in_the_gap
trainer = T.Trainer(load_train_config([], [f"output_dir={run}", *sys.argv[3:]]))
# past the constructor every rank sees the finished folder
assert (run / "RUN_RECORD").is_file() and (run / "config.yaml").is_file(), trainer.rank
print(f"rank {trainer.rank} ready", flush=True)
from forcelab.train.parallel import exit_processes
exit_processes()   # as the CLI ends a multi-process run (train/parallel.py)
""".replace("MARKER", MARKER).replace("RUN_RECORD", RUN_RECORD)


def launch(tmp_path, run, gap: bool, timeout=120):
    script = tmp_path / "gap.py"
    script.write_text(GAP_SCRIPT)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(script), str(run), "gap" if gap else "no-gap", *TINY],
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_a_rank_never_judges_the_folder_rank_0_is_making(tmp_path):
    proc = launch(tmp_path, tmp_path / "run", gap=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 ready" in proc.stdout and "rank 1 ready" in proc.stdout


def test_a_foreign_folder_stops_every_rank_with_the_same_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("not a run\n")
    proc = launch(tmp_path, run, gap=False)
    assert proc.returncode != 0
    # both ranks raise rank 0's verdict (none waits forever for a folder that will not come)
    for rank in (0, 1):
        assert any(line.startswith(f"[rank{rank}]") and "exists and was not written by forcelab" in line
                   for line in proc.stderr.splitlines()), proc.stderr[-3000:]
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]      # nothing written into it
