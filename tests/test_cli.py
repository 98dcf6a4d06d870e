"""The console script: help, user errors as one line with exit status 2, convert and info."""

import subprocess
import sys

import torch

from forcelab.cli import COMMANDS, main
from forcelab.models import CausalDiT, DiTConfig


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "forcelab", *args], capture_output=True, text=True)


def test_help_lists_every_command():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


def test_user_error_is_one_line_exit_2(tmp_path):
    out = run_cli("convert", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "not found" in out.stderr


def test_convert_round_trip(tmp_path, capsys):
    torch.manual_seed(0)
    model = CausalDiT(DiTConfig.preset("toy", num_layers=1))
    model.save_pretrained(tmp_path / "wan", format="wan")
    assert main(["convert", str(tmp_path / "wan"), str(tmp_path / "diff"), "--format", "diffusers"]) == 0
    assert (tmp_path / "diff" / "config.json").read_text().count("WanTransformer3DModel") == 1
    back = CausalDiT.from_pretrained(tmp_path / "diff")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert main(["info", str(tmp_path / "diff")]) == 0
    assert "parameters" in capsys.readouterr().out


def test_every_eval_command_says_what_it_does_in_its_help():
    import subprocess
    import sys

    for command in ("toybench", "vbench", "report", "exposure"):
        out = subprocess.run([sys.executable, "-m", "forcelab.cli", "eval", command, "--help"],
                             capture_output=True, text=True, timeout=120).stdout
        block = out.split("\n\n")[1].strip()                     # what follows the usage
        assert block and not block.startswith(("positional arguments", "options")), (command, out[:300])
