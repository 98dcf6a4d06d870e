"""Fault injection: a run folder has one writer, a resume is verified before it trains, nothing
is written through a link out of its folder, a non-finite abort names a checkpoint that is
really good, and the environment's faults (a full disk, a read-only folder, a linked
checkpoint) are one line each.

Each case asserts the exact outcome: exit 2 with one line on stderr naming the file and what to
do, and the run folder (or the user's file) unchanged. Concurrency is real but bounded: a second
process holds a lock and waits on a pipe; nothing sleeps and hopes.
"""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from forcelab import fsio, locks
from forcelab.cli import main
from forcelab.errors import ForcelabError
from forcelab.train import checkpoint as ckpt_io
from forcelab.train.config import load_train_config
from forcelab.train.trainer import Trainer, TrainingAborted

TINY = ["recipe=teacher", "model_overrides.dim=32", "model_overrides.ffn_dim=64", "model_overrides.num_layers=1",
        "model_overrides.num_heads=2", "data.frames=4", "data.batch_size=2", "logging.wandb=disabled",
        "logging.progress=false", "logging.every=100", "roles.generator.lr=1e-3", "checkpoint.every=1"]


def cli_error(capsys, *argv) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one line on stderr. Returns it."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, (rc, err)
    return err[0]


def cli_fails(capsys, *argv) -> str:
    """Run the CLI in-process; it must exit 2 with one error line (after the run's own log lines)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error:" in line]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, (rc, err)
    return errors[0]


def train(run, *extra, resume=True, drop=()):
    tiny = [a for a in TINY if a.split("=")[0] not in drop]
    return ["train", *tiny, f"output_dir={run}", *extra] + (["--resume", "latest"] if resume else [])


def tree(path):
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
                  for p in path.rglob("*"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished two-step run (checkpoints 1 and 2) to copy per case."""
    run = tmp_path_factory.mktemp("base") / "run"
    assert main(train(run, "max_steps=2", resume=False)) == 0
    return run


@pytest.fixture
def run(base, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(base, copy, symlinks=True)
    return copy


# ---------------------------------------------------------------------- one writer per folder
HOLDER = """
import sys
from forcelab.locks import lock_folder
held = lock_folder(sys.argv[1], "test")
print("held", flush=True)
sys.stdin.read()            # until the test closes the pipe (or kills us)
"""


@pytest.fixture
def holder():
    """Start a second process that holds a folder's lock until told to go; yields start(folder)."""
    procs = []

    def start(folder):
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=60)


def test_the_lock_names_its_holder_and_is_freed_on_release(tmp_path):
    first = locks.lock_folder(tmp_path, "output_dir")
    with pytest.raises(ForcelabError, match=f"in use by another forcelab run, pid {os.getpid()} on host "
                                            f"{socket.gethostname()}"):
        locks.lock_folder(tmp_path, "output_dir")
    first.release()
    assert not (tmp_path / fsio.LOCK).exists()        # released: nothing left behind
    with locks.lock_folder(tmp_path, "output_dir") as again:
        assert again.held
    (tmp_path / fsio.LOCK).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ForcelabError, match="is a symbolic link"):
        locks.lock_folder(tmp_path, "output_dir")
    assert not (tmp_path / "elsewhere").exists()


def test_a_second_run_into_a_held_folder_exits_2_and_a_crashed_holder_blocks_nothing(run, holder, capsys):
    before = tree(run)
    proc = holder(run)
    for args in (train(run, "max_steps=3"), train(run, "max_steps=3", resume=False)):
        line = cli_error(capsys, *args)
        assert f"in use by another forcelab run, pid {proc.pid} on host {socket.gethostname()}" in line
    assert [e for e in tree(run) if e[0] != fsio.LOCK] == before     # nothing but the holder's lock
    proc.send_signal(signal.SIGKILL)                 # a crash: its lock file stays, naming a dead pid
    proc.wait(timeout=60)
    assert json.loads((run / fsio.LOCK).read_text())["pid"] == proc.pid
    assert main(train(run, "max_steps=3")) == 0      # the kernel freed its lock: the resume runs
    assert (run / "checkpoint-000003").is_dir() and not (run / fsio.LOCK).exists()


def test_a_trainer_holds_its_folder_until_its_run_ends(tmp_path):
    cfg = load_train_config([], TINY + [f"output_dir={tmp_path / 'run'}", "max_steps=2"])
    first = Trainer(cfg)
    with pytest.raises(ForcelabError, match="in use by another forcelab run"):
        Trainer(cfg, resume="latest")
    first.run(stop_at=1)                             # run() ends: the folder is free
    second = Trainer(cfg, resume="latest")
    assert second.step == 1
    with pytest.raises(ForcelabError, match="in use by another forcelab run"):
        first.run()                                  # the first trainer cannot take it back
    second.run()
    assert second.step == 2


def test_preprocess_refuses_a_held_out_folder(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n")
    out = fsio.claim_directory(tmp_path / "shards", "--out", "preprocess")
    with locks.lock_folder(out, "--out"):
        line = cli_error(capsys, "preprocess", "--prompts", prompts, "--out", out, "--text-encoder", "toy")
    assert f"pid {os.getpid()}" in line and "--out" in line
    assert sorted(p.name for p in out.iterdir()) == [fsio.MARKER]


@pytest.mark.parametrize("command", ["demo", "study"])
def test_demo_and_study_refuse_a_folder_of_other_files_and_a_held_one(tmp_path, capsys, command):
    argv = ["demo", "--quick"] if command == "demo" else ["eval", "toybench", "--suite", "quick"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.json").write_text('{"mine": true}\n')
    (mine / "study.json").write_text('{"mine": true}\n')
    before = tree(mine)
    line = cli_error(capsys, *argv, "--out", mine)
    assert "not written by forcelab" in line and "new or empty folder" in line
    assert tree(mine) == before
    ours = fsio.claim_directory(tmp_path / "ours", "--out", command)
    with locks.lock_folder(ours, "--out"):
        assert f"pid {os.getpid()}" in cli_error(capsys, *argv, "--out", ours)
    assert sorted(p.name for p in ours.iterdir()) == [fsio.MARKER]


def test_each_command_writes_only_into_its_own_kind_of_folder(run, tmp_path, capsys):
    """A training run folder given to the demo, the study or preprocess (and a demo folder given to
    train) is refused with one line naming both kinds; nothing is written into it."""
    assert fsio.folder_kind(run) == "training"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n")
    before = tree(run)
    for argv, kind in ((["demo", "--quick"], "demo"), (["eval", "toybench", "--suite", "quick"], "study"),
                       (["preprocess", "--prompts", prompts, "--text-encoder", "toy"], "preprocess")):
        line = cli_error(capsys, *argv, "--out", run)
        assert f"--out {run}: a forcelab training folder; {kind} output goes only into a new, empty or earlier " \
               f"{kind} folder" in line, line
        assert tree(run) == before
    demo = fsio.claim_directory(tmp_path / "demo", "--out", "demo")
    line = cli_error(capsys, *train(demo, resume=False))
    assert f"output_dir {demo}: a forcelab demo folder; training output goes only into" in line
    assert fsio.folder_kind(demo) == "demo" and sorted(p.name for p in demo.iterdir()) == [fsio.MARKER]
    assert fsio.claim_directory(demo, "--out", "demo") == demo          # its own kind: reused


# ---------------------------------------------------------------------- resume verifies first
def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _edit_state(run, change):
    path = run / "checkpoint-000002" / "trainer_state.json"
    state = json.loads(path.read_text())
    path.write_text(json.dumps(change(state)))


@pytest.fixture(scope="module")
def other_size(tmp_path_factory):
    """A one-step run of a wider model (dim 48): its optimizer state has the same parameter count."""
    run = tmp_path_factory.mktemp("other") / "run"
    assert main(train(run, "max_steps=1", "model_overrides.dim=48", resume=False)) == 0
    return run / "checkpoint-000001"


CASES = {
    # case: (what it does to the run, extra overrides, what the line must name)
    # the config no longer sets dim: the toy preset's 96, while the checkpoint holds 32
    "model-of-another-size": (None, ["drop:model_overrides.dim"], "checkpoint-000002/generator: a model of another "
                                                                  "architecture than this run's (dim 32 (config 96)"),
    "other-recipe": (lambda r: _edit_state(r, lambda s: {**s, "recipe": "ar_diffusion"}), [],
                     "written by recipe 'ar_diffusion'"),
    "other-roles": (lambda r: _edit_state(r, lambda s: {**s, "roles": {**s["roles"], "critic": {"trainable": True}}}),
                    [], "trains role(s) ['critic', 'generator'], this run trains ['generator']"),
    "other-world-size": (lambda r: _edit_state(r, lambda s: {**s, "world_size": 2}), [], "written by 2 process(es)"),
    "state-a-list": (lambda r: (r / "checkpoint-000002" / "trainer_state.json").write_text("[1, 2]"), [],
                     "trainer_state.json: not a trainer state (a JSON list"),
    "state-without-step": (lambda r: _edit_state(r, lambda s: {k: v for k, v in s.items() if k != "step"}), [],
                           "trainer_state.json: lacks a whole-number 'step'"),
    "optimizer-truncated": (lambda r: _truncate(r / "checkpoint-000002" / "optim-generator.pt"), [],
                            "optim-generator.pt: damaged or truncated optimizer state"),
    "rng-truncated": (lambda r: _truncate(r / "checkpoint-000002" / "rng-rank0.pt"), [],
                      "rng-rank0.pt: damaged or truncated RNG state of rank 0"),
    "rng-missing": (lambda r: (r / "checkpoint-000002" / "rng-rank0.pt").unlink(), [], "rng-rank0.pt: missing"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_resume_that_does_not_fit_is_one_line_before_any_step(run, capsys, case):
    damage, extra, expect = CASES[case]
    if damage:
        damage(run)
    before = tree(run)
    drop = [e[len("drop:"):] for e in extra if e.startswith("drop:")]
    line = cli_error(capsys, *train(run, "max_steps=4", *[e for e in extra if not e.startswith("drop:")], drop=drop))
    assert expect in line and "Traceback" not in line, line
    assert tree(run) == before                       # nothing trained, logged or rewritten


def test_a_foreign_optimizer_state_is_refused(run, other_size, capsys):
    """Another model's optimizer state with as many tensors (of other shapes): torch would load it."""
    shutil.copy(other_size / "optim-generator.pt", run / "checkpoint-000002" / "optim-generator.pt")
    before = tree(run)
    line = cli_error(capsys, *train(run, "max_steps=4"))
    assert "optim-generator.pt: the optimizer state of another model" in line and "--resume" in line
    assert tree(run) == before


# ---------------------------------------------------------------------- never through a link
@pytest.mark.parametrize("name", ["config.yaml", "metrics.jsonl"])
def test_a_link_out_of_the_run_folder_is_never_written_through(run, tmp_path, capsys, name):
    outside = tmp_path / "users-file.txt"
    outside.write_text("precious\n")
    (run / name).unlink()
    (run / name).symlink_to(outside)
    line = cli_error(capsys, *train(run, "max_steps=4"))
    assert f"{run / name}: a symbolic link to {outside}, outside its folder" in line and "remove the link" in line
    assert outside.read_text() == "precious\n" and (run / name).is_symlink()
    assert not (run / "checkpoint-000003").exists()


def test_the_atomic_writer_follows_a_link_only_inside_its_folder(tmp_path):
    inside, outside = tmp_path / "run" / "real.txt", tmp_path / "outside.txt"
    inside.parent.mkdir()
    for f in (inside, outside):
        f.write_text("old\n")
    (tmp_path / "run" / "in").symlink_to(inside)
    (tmp_path / "run" / "out").symlink_to(outside)
    fsio.write_text_atomic(tmp_path / "run" / "in", "new\n")
    fsio.append_text(tmp_path / "run" / "in", "more\n")
    assert inside.read_text() == "new\nmore\n" and (tmp_path / "run" / "in").is_symlink()
    for write in (fsio.write_text_atomic, fsio.append_text):
        with pytest.raises(ForcelabError, match="outside its folder"):
            write(tmp_path / "run" / "out", "x\n")
    assert outside.read_text() == "old\n"


# ---------------------------------------------------------------------- non-finite abort
def test_the_abort_after_a_huge_learning_rate_names_a_checkpoint_with_finite_weights_and_loss(tmp_path):
    """lr -> 1e30 after step 2: the update of step 3 makes the weights ~1e30 (finite) and the loss of
    step 4 inf; checkpoint 3 holds those weights, so the good one is checkpoint 2."""
    cfg = load_train_config([], TINY + [f"output_dir={tmp_path / 'run'}", "max_steps=8", "checkpoint.keep_last=10",
                                        "max_nonfinite_steps=2"])
    trainer = Trainer(cfg)
    trainer.run(stop_at=2)
    role = trainer.roles["generator"]
    role.scheduler.base_lrs = [1e30]
    for group in role.optimizer.param_groups:
        group["lr"] = 1e30
    with pytest.raises(TrainingAborted) as aborted:
        trainer.run()
    message = str(aborted.value)
    assert f"the last good checkpoint (finite weights and loss) is {tmp_path / 'run' / 'checkpoint-000002'}" in message
    assert "the loss went non-finite right after checkpoint-000003" in message
    w3 = load_file(str(tmp_path / "run" / "checkpoint-000003" / "generator" / "diffusion_pytorch_model.safetensors"))
    w3 = torch.cat([t.flatten() for t in w3.values()])
    assert torch.isfinite(w3).all() and w3.abs().max() > 1e20     # finite, yet ruined


# ---------------------------------------------------------------------- the environment
def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_one(run, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(ckpt_io, "save_state", full)
    kept = tree(run / "checkpoint-000002")
    line = cli_fails(capsys, *train(run, "max_steps=3"))
    assert f"checkpoint {run / 'checkpoint-000003'}: No space left on device; free space on that disk" in line
    assert "--resume latest" in line
    assert tree(run / "checkpoint-000002") == kept
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-000001", "checkpoint-000002"]


def test_a_full_disk_while_logging_is_one_line(run, capsys, monkeypatch):
    from forcelab.train import metrics

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(metrics, "append_text", full)
    line = cli_fails(capsys, *train(run, "max_steps=3"))
    assert f"metrics {run / 'metrics.jsonl'}: No space left on device; free space" in line


@pytest.mark.parametrize("fresh", [True, False])
def test_a_read_only_output_dir_is_one_line(run, tmp_path, capsys, monkeypatch, fresh):
    target = tmp_path / "new-run" if fresh else run
    real_open, real_mkdir = os.open, os.mkdir

    def refuse(real):
        def call(path, *args, **kwargs):
            if str(path).startswith(str(target)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real(path, *args, **kwargs)
        return call
    monkeypatch.setattr(os, "open", refuse(real_open))
    monkeypatch.setattr(os, "mkdir", refuse(real_mkdir))
    before = tree(run)
    line = cli_error(capsys, *train(target, "max_steps=3", resume=not fresh))
    assert f"output_dir {target}" in line and "Read-only file system; choose a folder on a writable file system" in line
    assert tree(run) == before and not (tmp_path / "new-run").exists()


def test_a_linked_checkpoint_met_while_rotating_is_one_line_and_kept(run, tmp_path, capsys):
    elsewhere = tmp_path / "archive" / "checkpoint-000001"
    shutil.copytree(run / "checkpoint-000001", elsewhere)
    shutil.rmtree(run / "checkpoint-000001")
    (run / "checkpoint-000001").symlink_to(elsewhere)
    line = cli_fails(capsys, *train(run, "max_steps=3", "checkpoint.keep_last=2"))
    assert f"checkpoint {run / 'checkpoint-000001'}: a symbolic link" in line and "--resume latest" in line
    assert (run / "checkpoint-000001").is_symlink() and (elsewhere / "trainer_state.json").is_file()
    assert (run / "checkpoint-000003" / "trainer_state.json").is_file()     # the new one was saved first


def test_a_forked_child_neither_keeps_nor_deletes_its_parents_lock(tmp_path):
    """DataLoader workers are forked: a child does not count as a holder (it could not delete the
    lock file on its way out), and the folder is free as soon as the parent releases it."""
    lock = locks.lock_folder(tmp_path, "output_dir")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child outlives the parent's release, then exits normally
        os.close(w)
        os.read(r, 1)
        os._exit(0 if not lock.held and (tmp_path / fsio.LOCK).exists() else 1)
    os.close(r)
    lock.release()
    with locks.lock_folder(tmp_path, "output_dir"):    # free although the child still runs
        os.write(w, b"x")
        _, status = os.waitpid(pid, 0)
    os.close(w)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@pytest.mark.parametrize("value", ["-1", "0", "100000", "two"])
def test_demo_threads_out_of_range_is_refused_before_any_folder_exists(tmp_path, capsys, value):
    line = cli_error(capsys, "demo", "--quick", "--threads", value, "--out", tmp_path / "demo")
    assert "argument --threads" in line and not (tmp_path / "demo").exists()


def test_resume_latest_with_nothing_to_resume_says_it_starts_a_new_run(tmp_path, capsys):
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(train(run, "max_steps=1")) == 0
    out = capsys.readouterr().err
    assert f"--resume latest: {run} holds no checkpoint yet; starting a new run at step 0" in out
    assert main(train(run, "max_steps=2")) == 0                    # now there is one: resumed, no such note
    out = capsys.readouterr().err
    assert "resumed from" in out and "holds no checkpoint yet" not in out
