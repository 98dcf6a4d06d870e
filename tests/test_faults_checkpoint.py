"""Fault injection: checkpoint save/load, convert and the atomic directory swap (fsio).

Each case asserts the exact outcome: a clear one-line error (exit 2 on the CLI, a
ForcelabError in the API) or the documented valid behaviour. Kills are real: a forked child
SIGKILLs itself at each step of the swap, then the parent checks that a loadable checkpoint
(the old or the new one) remains and that the next save leaves nothing behind.
"""

import errno
import json
import os
import signal
import stat

import pytest
import torch
from safetensors import SafetensorError

from forcelab import fsio
from forcelab.cli import main
from forcelab.errors import CheckpointError, ForcelabError
from forcelab.models import CausalDiT, DiTConfig
from forcelab.models import checkpoint as ckpt_mod

CONFIG = DiTConfig.preset("toy", num_layers=1)
SWAP_STEPS = ["tmp-created", "mid-write", "written", "ready", "old-moved", "new-moved", "done"]


def model(seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CausalDiT(CONFIG)


@pytest.fixture(scope="module")
def models():
    return {seed: model(seed) for seed in (1, 2, 3)}


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and ".forcelab-" in p.name)


def cli_error(capsys, *argv):
    """Run the CLI in-process; it must exit 2 with exactly one line on stderr. Returns it."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, (rc, err)
    return err[0]


def tree(path):
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else None) for p in path.rglob("*"))


# ---------------------------------------------------------------------- kills at every step
def _save_and_die_at(step, target, m):
    """Fork: the child saves `m` to `target` and SIGKILLs itself at `step`."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            def die(name):
                if name == step:
                    os.kill(os.getpid(), signal.SIGKILL)
            fsio._step = die
            if step == "mid-write":  # half a weights file, then the kill
                def half(tensors, filename, metadata=None):
                    with open(filename, "wb") as f:
                        f.write(b"\0" * 1000)
                    os.kill(os.getpid(), signal.SIGKILL)
                ckpt_mod.save_file = half
            m.save_pretrained(target)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.parametrize("step", SWAP_STEPS)
def test_kill_at_each_step_of_replacing_a_checkpoint_leaves_old_or_new(tmp_path, models, step):
    target = tmp_path / "ckpt"
    models[1].save_pretrained(target)
    killed = _save_and_die_at(step, target, models[2])
    assert killed, step
    loaded = CausalDiT.from_pretrained(target)                  # a reader recovers, never "not found"
    is_old, is_new = same_weights(loaded, models[1]), same_weights(loaded, models[2])
    assert is_old or is_new
    # once the new copy is complete and the old one moved, the reader rolls forward
    assert is_new == (step in ("old-moved", "new-moved", "done")), step
    models[3].save_pretrained(target)                           # the next save cleans up
    assert leftovers(tmp_path) == []
    assert same_weights(CausalDiT.from_pretrained(target), models[3])


@pytest.mark.parametrize("step", ["tmp-created", "mid-write", "written", "ready"])
def test_kill_during_a_first_save_leaves_nothing_loadable_by_mistake(tmp_path, models, step):
    target = tmp_path / "ckpt"
    assert _save_and_die_at(step, target, models[2])
    if step == "ready":  # the complete new copy is found by the reader
        assert same_weights(CausalDiT.from_pretrained(target), models[2])
    else:
        with pytest.raises(CheckpointError, match="not found"):
            CausalDiT.from_pretrained(target)
    assert models[3].save_pretrained(target) == target
    assert leftovers(tmp_path) == [] and same_weights(CausalDiT.from_pretrained(target), models[3])


def test_exception_inside_the_write_removes_the_temporary_and_keeps_the_old(tmp_path, models):
    target = tmp_path / "ckpt"
    models[1].save_pretrained(target)
    with pytest.raises(RuntimeError):
        with fsio.atomic_directory(target, overwrite=True) as tmp:
            (tmp / "partial").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert leftovers(tmp_path) == [] and same_weights(CausalDiT.from_pretrained(target), models[1])


def test_stale_temporaries_of_other_saves_in_the_folder_are_cleaned(tmp_path, models):
    """A killed save of checkpoint-A leaves .checkpoint-A.forcelab-tmp-*; saving B cleans it,
    but never a temporary whose writer is still running (this process)."""
    assert _save_and_die_at("written", tmp_path / "a", models[1])
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(".a.forcelab-tmp-")
    live = fsio._tmp_name(tmp_path / "c")  # named with our own pid: a write in progress
    live.mkdir()
    models[2].save_pretrained(tmp_path / "b")
    assert leftovers(tmp_path) == [live.name]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_saved_folders_and_files_follow_the_umask(tmp_path, models, umask):
    old = os.umask(umask)
    try:
        out = models[1].save_pretrained(tmp_path / "ckpt")
        fsio.write_text_atomic(tmp_path / "f.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for f in [*out.iterdir(), tmp_path / "f.json"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


# ---------------------------------------------------------------------- never delete user files
@pytest.fixture(scope="module")
def toymodel(tmp_path_factory, models):
    return models[1].save_pretrained(tmp_path_factory.mktemp("src") / "toymodel")


def user_folder(path):
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("precious")
    (path / "sub" / "data.bin").write_bytes(b"\1\2")
    return tree(path)


def test_convert_refuses_a_folder_it_did_not_write(tmp_path, toymodel, capsys):
    dest = tmp_path / "out" / "mydata"
    before = user_folder(dest)
    for extra in ([], ["--overwrite"]):
        line = cli_error(capsys, "convert", toymodel, dest, *extra)
        assert "not written by forcelab" in line and "new folder" in line
        assert tree(dest) == before


def test_convert_into_the_current_folder_is_refused_without_leftovers(tmp_path, toymodel, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("precious")
    before = tree(tmp_path)
    line = cli_error(capsys, "convert", toymodel, ".")
    assert "not written by forcelab" in line
    assert tree(tmp_path) == before


def test_convert_replaces_its_own_output_only_with_overwrite(tmp_path, toymodel, capsys):
    dest = tmp_path / "conv"
    assert main(["convert", str(toymodel), str(dest), "--format", "wan"]) == 0
    assert json.loads((dest / "config.json").read_text())["_class_name"] == "WanModel"
    assert "--overwrite" in cli_error(capsys, "convert", toymodel, dest)
    assert main(["convert", str(toymodel), str(dest), "--overwrite"]) == 0
    assert json.loads((dest / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"
    assert leftovers(tmp_path) == []


def test_convert_into_an_empty_folder_is_fine(tmp_path, toymodel):
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(toymodel), str(tmp_path / "empty")]) == 0
    assert fsio.written_by_forcelab(tmp_path / "empty")


@pytest.mark.parametrize("case", ["file", "under-a-file", "same", "inside-source", "contains-source",
                                  "read-only", "bad-dtype", "bad-format"])
def test_convert_bad_destinations_and_flags(tmp_path, toymodel, capsys, monkeypatch, case):
    dest, extra, expect = tmp_path / "d", [], None
    if case == "file":
        dest.write_text("x")
        expect = "is a file"
    elif case == "under-a-file":
        (tmp_path / "f").write_text("x")
        dest, expect = tmp_path / "f" / "sub", "is a file"
    elif case == "same":
        dest, expect = toymodel, "source"
    elif case == "inside-source":
        dest, expect = toymodel / "sub", "source"
    elif case == "contains-source":
        dest, expect = toymodel.parent, "contains the source"
    elif case == "read-only":
        monkeypatch.setattr(fsio, "_writable", lambda d: False)
        expect = "not writable"
    elif case == "bad-dtype":
        extra, expect = ["--dtype", "fp8"], "argument --dtype"
    elif case == "bad-format":
        extra, expect = ["--format", "onnx"], "argument --format"
    before, source = tree(tmp_path), tree(toymodel)
    assert expect in cli_error(capsys, "convert", toymodel, dest, *extra)
    assert tree(tmp_path) == before and tree(toymodel) == source


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_is_refused_before_work(tmp_path, toymodel, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert "not writable" in cli_error(capsys, "convert", toymodel, ro / "out")
    finally:
        ro.chmod(0o755)


def test_save_pretrained_never_replaces_a_user_folder(tmp_path, models):
    before = user_folder(tmp_path / "mine")
    with pytest.raises(ForcelabError, match="not written by forcelab"):
        models[1].save_pretrained(tmp_path / "mine")
    assert tree(tmp_path / "mine") == before
    models[1].save_pretrained(tmp_path / "ours")
    with pytest.raises(ForcelabError, match="--overwrite"):
        models[2].save_pretrained(tmp_path / "ours", overwrite=False)
    assert same_weights(CausalDiT.from_pretrained(tmp_path / "ours"), models[1])


def test_tilde_is_expanded(tmp_path, models, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    out = models[1].save_pretrained("~/ckpt")
    assert out == tmp_path / "home" / "ckpt" and not (tmp_path / "~").exists()
    assert same_weights(CausalDiT.from_pretrained("~/ckpt"), models[1])


# ---------------------------------------------------------------------- weight files
def test_a_stray_safetensors_beside_the_weights_is_ignored(tmp_path, models):
    target = models[1].save_pretrained(tmp_path / "ckpt")
    other = models[2].save_pretrained(tmp_path / "other")
    (target / "copy of weights.safetensors").write_bytes((other / ckpt_mod.WEIGHTS_NAME).read_bytes())
    assert same_weights(CausalDiT.from_pretrained(target), models[1])


def test_several_weight_files_without_index_are_ambiguous(tmp_path, models):
    target = models[1].save_pretrained(tmp_path / "ckpt")
    (target / ckpt_mod.WEIGHTS_NAME).rename(target / "a.safetensors")
    (target / "b.safetensors").write_bytes((target / "a.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="2 weight files .* no diffusion_pytorch_model.safetensors.index.json"):
        CausalDiT.from_pretrained(target)
    (target / "b.safetensors").unlink()  # a single file under another name is fine
    assert same_weights(CausalDiT.from_pretrained(target), models[1])


def test_a_weight_in_two_shards_is_an_error(tmp_path, models):
    target = models[1].save_pretrained(tmp_path / "ckpt", max_shard_bytes=50_000)
    index = json.loads((target / ckpt_mod.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    from safetensors.torch import load_file, save_file
    first, second = load_file(target / shards[0]), load_file(target / shards[1])
    key = next(iter(first))
    save_file({**second, key: first[key]}, str(target / shards[1]))
    with pytest.raises(CheckpointError, match=f"{key}.* in both"):
        CausalDiT.from_pretrained(target)


@pytest.mark.parametrize("case", ["index-escapes", "index-not-json", "config-binary", "config-list",
                                  "config-missing-key"])
def test_damaged_checkpoint_files_name_the_file(tmp_path, models, case):
    target = models[1].save_pretrained(tmp_path / "ckpt")
    if case == "index-escapes":
        (target / ckpt_mod.INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "../other.safetensors"}}))
        match = "file names inside the folder"
    elif case == "index-not-json":
        (target / ckpt_mod.INDEX_NAME).write_text("{")
        match = "not a safetensors index"
    elif case == "config-binary":
        (target / "config.json").write_bytes(b"\xff\xfe\x00garbage")
        match = "config.json: not valid JSON"
    elif case == "config-list":
        (target / "config.json").write_text("[1, 2]")
        match = "expected a JSON object"
    else:
        raw = json.loads((target / "config.json").read_text())
        del raw["num_layers"]
        (target / "config.json").write_text(json.dumps(raw))
        match = "lacks or mistypes 'num_layers'"
    with pytest.raises(CheckpointError, match=match):
        CausalDiT.from_pretrained(target)


def test_a_checkpoint_config_with_zero_heads_is_a_clear_error(tmp_path, models):
    target = models[1].save_pretrained(tmp_path / "ckpt")
    raw = json.loads((target / "config.json").read_text())
    raw["num_attention_heads"] = 0
    (target / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ForcelabError, match="config.json: num_attention_heads must be a whole number >= 1, got 0"):
        CausalDiT.from_pretrained(target)



@pytest.mark.parametrize("entry, match", [
    ("x", "the 'forcelab' entry must be a JSON object of forcelab settings .*got str"),
    ([1], "the 'forcelab' entry must be a JSON object .*got list"),
    ({"window": 3}, r"unknown 'forcelab' settings \['window'\]; known: text_len"),
])
def test_a_mangled_forcelab_entry_in_config_json_is_one_clear_line(tmp_path, models, capsys, entry, match):
    target = models[1].save_pretrained(tmp_path / "ckpt")
    raw = json.loads((target / "config.json").read_text())
    raw["forcelab"] = entry
    (target / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=match):
        CausalDiT.from_pretrained(target)
    line = cli_error(capsys, "convert", target, tmp_path / "out")
    assert "config.json" in line and "forcelab" in line


def test_a_full_disk_while_writing_weights_is_an_os_error_naming_the_destination(tmp_path, models, capsys,
                                                                                  monkeypatch):
    """safetensors wraps the system's error in its own class (message as in safetensors 0.4-0.7)."""
    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    source = models[1].save_pretrained(tmp_path / "ckpt")
    monkeypatch.setattr(ckpt_mod, "save_file", full_disk)
    with pytest.raises(OSError) as info:
        models[1].save_pretrained(tmp_path / "dest")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "dest")
    assert not (tmp_path / "dest").exists() and os.listdir(tmp_path) == ["ckpt"]
    line = cli_error(capsys, "convert", source, tmp_path / "dest2")
    assert f"{tmp_path / 'dest2'}: No space left on device; free space on that disk" in line

    def other(*args, **kwargs):
        raise SafetensorError("Error while serializing: something else")
    monkeypatch.setattr(ckpt_mod, "save_file", other)
    with pytest.raises(SafetensorError, match="something else"):   # not a system error: not disguised as one
        models[1].save_pretrained(tmp_path / "dest3")

# ---------------------------------------------------------------------- fsio contract
def test_atomic_directory_contract(tmp_path, monkeypatch):
    """Default: a folder forcelab wrote is replaced; overwrite=False refuses it; a reader that
    finishes the swap while the writer is between its renames does not break the writer."""
    target = tmp_path / "checkpoint-000006"
    with fsio.atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    assert fsio.written_by_forcelab(target) and not fsio.written_by_forcelab(tmp_path)
    with pytest.raises(ForcelabError, match="--overwrite"):
        with fsio.atomic_directory(target, overwrite=False):
            raise AssertionError("the check must come before the body runs")
    monkeypatch.setattr(fsio, "_step", lambda name: fsio.recover(target) if name == "old-moved" else None)
    with fsio.atomic_directory(target) as tmp:
        (tmp / "a").write_text("2")
    assert (target / "a").read_text() == "2" and leftovers(tmp_path) == []
    assert sorted(p.name for p in target.iterdir()) == [fsio.MARKER, "a"]


def test_the_reported_convert_reproducer_as_a_subprocess(tmp_path, toymodel):
    """`forcelab convert toymodel out/mydata` onto a user's folder: exit 2, one line, nothing lost."""
    import subprocess
    import sys

    dest = tmp_path / "out" / "mydata"
    before = user_folder(dest)
    r = subprocess.run([sys.executable, "-m", "forcelab", "convert", str(toymodel), str(dest)],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "not written by forcelab" in r.stderr and tree(dest) == before


def test_remove_directory_deletes_only_forcelab_folders_and_never_leaves_a_partial_one(tmp_path, models):
    before = user_folder(tmp_path / "mine")
    with pytest.raises(ForcelabError, match="not written by forcelab"):
        fsio.remove_directory(tmp_path / "mine")
    assert tree(tmp_path / "mine") == before
    old = models[1].save_pretrained(tmp_path / "checkpoint-000002")
    pid = os.fork()
    if pid == 0:  # killed right after the rename, before any file is deleted
        fsio._step = lambda name: os.kill(os.getpid(), signal.SIGKILL) if name == "remove-renamed" else None
        fsio.remove_directory(old)
        os._exit(0)
    os.waitpid(pid, 0)
    assert not old.exists() and len(leftovers(tmp_path)) == 1
    models[2].save_pretrained(tmp_path / "checkpoint-000004")  # the next save cleans it
    assert leftovers(tmp_path) == []
    fsio.remove_directory(tmp_path / "checkpoint-000004")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_links_are_never_replaced_deleted_or_written_through(tmp_path, models):
    """A link where forcelab would replace a folder, delete an old one or put its marker: refused,
    and what the link points to is untouched."""
    real = models[1].save_pretrained(tmp_path / "real")
    before = tree(real)
    (tmp_path / "ckpt").symlink_to(real)
    with pytest.raises(ForcelabError, match="a symbolic link .* does not replace links"):
        models[2].save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ForcelabError, match="a symbolic link .* does not delete through links"):
        fsio.remove_directory(tmp_path / "ckpt")
    assert (tmp_path / "ckpt").is_symlink() and tree(real) == before
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / fsio.MARKER).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ForcelabError, match="not forcelab's marker"):
        fsio.mark(tmp_path / "new")
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("key, value", [("num_attention_heads", "2"), ("attention_head_dim", 2.5),
                                        ("num_attention_heads", True), ("attention_head_dim", 0)])
def test_a_mistyped_head_count_in_a_diffusers_config_names_the_key(tmp_path, models, key, value):
    target = models[1].save_pretrained(tmp_path / "ckpt")
    raw = json.loads((target / "config.json").read_text())
    raw[key] = value
    (target / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=f"config.json: {key} must be a whole number >= 1, got {value!r}"):
        CausalDiT.from_pretrained(target)
