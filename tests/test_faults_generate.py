"""Fault injection: `forcelab generate` (generate/cli.py, generate/api.py) through the CLI, in-process.

Every bad flag ends in exit status 2 and one line on stderr naming the flag and what to do,
before any weights are loaded or any file is written; earlier results are never replaced
silently, and a file forcelab did not write never is.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from forcelab import fsio
from forcelab.cli import main
from forcelab.models import CausalDiT


@pytest.fixture
def ckpt(toy_dit):
    return toy_dit                   # a one-layer toy DiT (tests/conftest.py)


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if generate gets as far as loading the DiT's weights."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad input was reported")
    monkeypatch.setattr(CausalDiT, "from_pretrained", classmethod(refuse))


def argv(ckpt, out, *extra):
    return ["generate", str(ckpt), "--vae", "toy", "--text-encoder", "toy", "--output", str(out), "--quiet",
            *map(str, extra)]


def one_line_error(capsys, args) -> str:
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, (rc, err)
    assert err[0].startswith("forcelab generate: error:")
    return err[0]


# flag values -> a part of the expected one-line error
BAD_FLAGS = {
    "frames-0": (["--frames", 0], "argument --frames: must be a whole number >= 1, got '0'"),
    "frames-neg": (["--frames", -3], "argument --frames: must be a whole number >= 1"),
    "frames-text": (["--frames", "many"], "argument --frames: must be a whole number"),
    "frames-odd": (["--frames", 3], "--frames 3: the chunkwise plan needs a whole number"),
    "height-0": (["--height", 0, "--width", 0], "argument --height: must be a whole number >= 1"),
    "height-neg": (["--height", -32], "argument --height: must be a whole number >= 1"),
    "width-0": (["--width", 0], "argument --width"),
    "height-huge": (["--height", 64000], "the model's RoPE table has 1024 (rope_max_len)"),
    "height-odd": (["--height", 30], "must be multiples of 8"),
    "frames-huge": (["--frames", 2_000_000_000, "--window", 4], "needs about"),
    "frames-no-window": (["--frames", 4096], "more than the model's RoPE table"),
    "steps-huge": (["--steps", 1_000_000_000], "--steps must be between 1 and 1000"),
    "steps-0": (["--steps", 0], "--steps must be between 1 and 1000"),
    "steps-text": (["--steps", "abc"], "--steps 'abc': give a number of steps"),
    "steps-nan": (["--steps", "nan"], "--steps 'nan'"),
    "steps-list-nan": (["--steps", "1000,nan"], "--steps '1000,nan'"),
    "steps-list-range": (["--steps", "2000,500"], "--steps: every timestep must be between 0 and 1000"),
    "fps-0": (["--fps", 0], "argument --fps: must be between 0.01 and 1000"),
    "fps-nan": (["--fps", "nan"], "argument --fps: must be a finite number"),
    "fps-huge": (["--fps", "1e30"], "argument --fps: must be between 0.01 and 1000"),
    "fps-tiny": (["--fps", "1e-30"], "argument --fps: must be between 0.01 and 1000"),
    "samples-0": (["--samples", 0], "argument --samples"),
    "samples-huge": (["--samples", 10**9], "prompts x --samples must be between 1 and 100000"),
    "batch-0": (["--batch", 0], "argument --batch"),
    "seed-neg": (["--seed", -1], "argument --seed: must be a whole number from 0 to 2^63 - 1"),
    "seed-2-64": (["--seed", 2**64], "argument --seed: must be a whole number from 0 to 2^63 - 1"),
    "seed-last": (["--seed", 2**63 - 1, "--samples", 2], "--seed + --samples - 1 must be a whole number from 0"),
    "shift-0": (["--shift", 0], "argument --shift: must be > 0"),
    "guidance-nan": (["--plan", "teacher", "--guidance", "nan"], "argument --guidance: must be a finite number"),
    "context-noise": (["--context-noise", 1000], "argument --context-noise: must be between 0 and 999"),
    "chunk-0": (["--chunk", 0], "argument --chunk"),
    "window-neg": (["--window", -1], "argument --window: must be a whole number >= 0"),
    "sink-neg": (["--sink", -1], "argument --sink"),
    "recache-neg": (["--recache-frames", -1], "argument --recache-frames"),
    "switch-neg": (["--switch=-2:b"], "--switch '-2:b': FRAME must be a whole number >= 1"),
    "switch-neg-spaced": (["--switch", "-2:b"], "argument --switch: expected one argument"),
    "switch-0": (["--switch", "0:b"], "FRAME must be a whole number >= 1"),
    "switch-text": (["--switch", "x:b"], "FRAME must be a whole number"),
    "switch-no-prompt": (["--switch", "5:"], "write FRAME:PROMPT"),
    "switch-not-boundary": (["--frames", 8, "--switch", "3:b"], "switches go at chunk boundaries"),
    "device-gpu0": (["--device", "gpu0"], "--device 'gpu0': not a device; write cpu, cuda or cuda:N"),
    "device-empty": (["--device", ""], "--device '': not a device"),
    "device-cuda99": (["--device", "cuda:99"], "--device cuda:99"),
    "device-mps": (["--device", "meta"], "forcelab runs on cpu or cuda devices"),
    "dtype": (["--dtype", "fp8"], "argument --dtype: invalid choice"),
    "plan": (["--plan", "magic"], "argument --plan: invalid choice"),
    "teacher-window": (["--plan", "teacher", "--window", 4], "--window does not apply to the teacher"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_fail_before_any_work(ckpt, tmp_path, capsys, no_loading, case):
    extra, expected = BAD_FLAGS[case]
    if case == "device-cuda99" and not torch.cuda.is_available():
        expected = "no CUDA device here"
    out = tmp_path / "out"
    line = one_line_error(capsys, argv(ckpt, out, "--prompt", "a red ball", *extra))
    assert expected in line, line
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu(ckpt, tmp_path, capsys, no_loading):
    line = one_line_error(capsys, argv(ckpt, tmp_path / "o", "--prompt", "a", "--device", "cuda"))
    assert "no CUDA device here; use --device cpu" in line


@pytest.mark.parametrize("case", ["is-a-file", "under-a-file", "read-only"])
def test_unusable_output_locations_fail_before_any_work(ckpt, tmp_path, capsys, monkeypatch, no_loading, case):
    out = tmp_path / "out"
    if case == "is-a-file":
        out.write_text("mine")
        expected = "--output " + str(out) + ": is a file"
    elif case == "under-a-file":
        (tmp_path / "f").write_text("mine")
        out, expected = tmp_path / "f" / "videos", "is a file, so this folder cannot be created"
    else:
        out.mkdir()
        monkeypatch.setattr(fsio, "_writable", lambda d: False)
        expected = "is not writable"
    assert expected in one_line_error(capsys, argv(ckpt, out, "--prompt", "a"))


@pytest.mark.parametrize("case", ["binary", "latin1", "missing", "empty", "extended-mismatch"])
def test_bad_prompt_files(ckpt, tmp_path, capsys, no_loading, case):
    prompts = tmp_path / "p.txt"
    extra = ["--prompts", prompts]
    if case == "binary":
        prompts.write_bytes(b"a cat\n\x89PNG\r\n\x1a\n\x00\x00")
        expected = "p.txt:2: not UTF-8 text"
    elif case == "latin1":
        prompts.write_bytes("un caf\u00e9\n".encode("latin-1"))
        expected = "p.txt:1: not UTF-8 text (byte 0xe9 at column 7)"
    elif case == "missing":
        expected = "file not found"
    elif case == "empty":
        prompts.write_text("\n\n")
        expected = "no prompt"
    else:
        prompts.write_text("a\nb\n")
        (tmp_path / "e.txt").write_text("only one\n")
        extra += ["--extended-prompts", tmp_path / "e.txt"]
        expected = "line-aligned"
    assert expected in one_line_error(capsys, argv(ckpt, tmp_path / "o", *extra))


def test_a_bom_prompt_file_is_read(ckpt, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes("\ufeffa red ball\n".encode("utf-8"))
    assert main(argv(ckpt, tmp_path / "o", "--prompts", prompts, "--frames", 2, "--vbench")) == 0
    assert (tmp_path / "o" / "a red ball-0.mp4").is_file()


# ---------------------------------------------------------------------- earlier results
def test_a_second_run_never_replaces_earlier_results_silently(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(argv(ckpt, out, "--prompt", "a red ball", "--frames", 2, "--seed", 1)) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["0000-a_red_ball-0.json", "0000-a_red_ball-0.mp4"]
    line = one_line_error(capsys, argv(ckpt, out, "--prompt", "a red ball", "--frames", 4, "--seed", 2))
    assert "already holds 1 of this run's files (e.g. 0000-a_red_ball-0.mp4)" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    # --overwrite replaces forcelab's own earlier videos
    assert main(argv(ckpt, out, "--prompt", "a red ball", "--frames", 4, "--seed", 2, "--overwrite")) == 0
    assert json.loads((out / "0000-a_red_ball-0.json").read_text())["seed"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(first)  # no temporaries left
    # other prompts write beside the earlier files
    assert main(argv(ckpt, out, "--prompts", _write(tmp_path / "p.txt", "x\ny\n"), "--frames", 2,
                     "--vbench")) == 0
    assert {"x-0.mp4", "y-0.mp4"} <= {p.name for p in out.iterdir()}


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("foreign", ["0000-a_red_ball-0.mp4", "0000-a_red_ball-0.json"])
def test_a_file_forcelab_did_not_write_is_never_replaced(ckpt, tmp_path, capsys, no_loading, foreign):
    out = tmp_path / "out"
    out.mkdir()
    (out / foreign).write_text("my own file")
    for extra in ([], ["--overwrite"]):
        line = one_line_error(capsys, argv(ckpt, out, "--prompt", "a red ball", "--frames", 2, *extra))
        assert "0000-a_red_ball-0.mp4" in line
        assert (out / foreign).read_text() == "my own file"
    assert "was not written by forcelab" in line


def test_tilde_in_output_is_the_home_folder(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(argv(ckpt, "~/videos", "--prompt", "a", "--frames", 2)) == 0
    assert (tmp_path / "home" / "videos" / "0000-a-0.mp4").is_file() and not (tmp_path / "~").exists()


def test_frames_zero_is_an_error_not_the_default_as_a_subprocess(ckpt, tmp_path):
    """The console entry point itself: exit status 2, one line, no traceback."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "forcelab", *argv(ckpt, tmp_path / "o", "--prompt", "a",
                                                                  "--frames", 0)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--frames" in r.stderr
    assert "Traceback" not in r.stderr


def test_info_height_negative(capsys):
    rc = main(["info", "toy", "--height", "-4", "--width", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "argument --height: must be a whole number >= 1, got '-4'" in err[0]
    assert main(["info", "toy", "--height", "8", "--width", "8"]) == 0
    assert "tokens_per_frame   16" in capsys.readouterr().out
    assert main(["info", "toy", "--height", "7", "--width", "8"]) == 2
    assert "multiples of the patch size (2x2)" in capsys.readouterr().err
    assert main(["info", "toy", "--height", "8"]) == 2
    assert "--height and --width go together" in capsys.readouterr().err


def test_unknown_command_is_one_line(capsys):
    assert main(["genrate", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'genrate'" in err[0]
