"""A command imports what it runs, nothing more: `forcelab` alone imports no torch; the
generate command (module and a real run on the committed toy teacher) imports none of the
training, distillation or evaluation stacks, nor a decoder or framework it does not use.
Each check runs in a fresh interpreter, so what this test session imported does not count."""

import json
import subprocess
import sys
from pathlib import Path

import forcelab

TEACHER = Path(__file__).resolve().parents[1] / "configs" / "toy" / "teacher_checkpoint"

# what a generate run never needs: forcelab's upper layers, the config machinery (omegaconf,
# YAML) of training, the frameworks of training, Wan-scale loading, plots, logs and decoding
NOT_FOR_GENERATE = (
    "forcelab.train", "forcelab.distill", "forcelab.eval", "forcelab.pipeline", "forcelab.demo",
    "forcelab.study", "forcelab.config", "omegaconf", "yaml", "accelerate", "deepspeed", "diffusers",
    "transformers", "matplotlib", "tensorboard", "webdataset", "decord")
VIDEO_WRITER = "av"            # the mp4 backend: imported by the write, not by the import
COMPILER = ("torch._dynamo", "sympy")   # torch's compiler stack: no generate code compiles


def imported_after(code: str, watched) -> list[str]:
    """The watched modules present in sys.modules after a fresh interpreter runs `code`."""
    script = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {list(watched)!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_console_script_alone_imports_no_torch():
    """`forcelab --help` and the dispatch: every command module is imported only when chosen."""
    watched = ("torch", *NOT_FOR_GENERATE, "forcelab.generate", "forcelab.data", "forcelab.models")
    assert imported_after("import forcelab.cli", watched) == []


def test_generate_command_module_imports_only_what_generation_uses():
    """The module `forcelab generate` imports (as the console script does), before any run."""
    code = ("import importlib\nfrom forcelab.cli import COMMANDS\n"
            "importlib.import_module(COMMANDS['generate'][0])")
    assert imported_after(code, (*NOT_FOR_GENERATE, VIDEO_WRITER, *COMPILER)) == []


def test_generate_run_imports_only_what_it_uses(tmp_path):
    """A real run writing one mp4: the video writer is imported, none of the rest (nor torch's
    compiler stack, which drawing tables on the meta device used to import: seconds per start)."""
    out = tmp_path / "videos"
    code = (f"from forcelab.cli import main\n"
            f"assert main(['generate', {str(TEACHER)!r}, '--prompt', 'a red ball', '--frames', '4', "
            f"'--device', 'cpu', '--quiet', '--output', {str(out)!r}]) == 0")
    assert imported_after(code, (*NOT_FOR_GENERATE, VIDEO_WRITER, *COMPILER)) == [VIDEO_WRITER]
    assert len(list(out.glob("*.mp4"))) == 1


def test_a_process_started_in_the_checkout_does_not_see_subpackages_as_top_level_modules():
    """The checkout's root is the package folder: `python -m ...` started there puts it on sys.path,
    where forcelab's `kernels/` would shadow the installed distribution of that name (which
    transformers imports). Importing forcelab drops the folder from sys.path."""
    package = Path(forcelab.__file__).parent
    code = ("import importlib.util, json, sys, forcelab\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(json.dumps(spec.origin if spec and spec.origin else None))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=package, check=True)
    origin = json.loads(out.stdout.strip().splitlines()[-1])
    assert origin is None or Path(origin).resolve() != (package / "kernels" / "__init__.py").resolve(), origin
