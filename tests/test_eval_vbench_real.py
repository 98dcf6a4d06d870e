"""The real VBench, opt-in (`make test-vbench`, or FORCELAB_VBENCH_PYTHON=PATH): videos generated
by the committed toy teacher are scored by VBench in its own environment, and every dimension
forcelab also computes natively must agree with it. Dimensions that need weights run too when
VBench's cache folder ($VBENCH_CACHE_DIR, else ~/.cache/vbench) holds them; they are checked to
land in 0..1 and to enter the aggregate.

Build the environment with `make vbench-env` (see the Makefile)."""

import os
from pathlib import Path

import pytest

from forcelab.cli import main
from forcelab.eval import vbench as vb
from forcelab.eval.vbench_runner import WEIGHTS, run_vbench, weights_folder

PYTHON = os.environ.get("FORCELAB_VBENCH_PYTHON")
TEACHER = Path(__file__).resolve().parents[1] / "configs" / "toy" / "teacher_checkpoint"

pytestmark = pytest.mark.skipif(
    not PYTHON or not Path(PYTHON).expanduser().is_file(),
    reason=f"no VBench python (FORCELAB_VBENCH_PYTHON={PYTHON or 'unset'}): build one with `make vbench-env`, "
           f"then `make test-vbench`, or point FORCELAB_VBENCH_PYTHON at a python with VBench installed")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Suite prompts (temporal_flickering's and subject_consistency's), 2 samples each, generated."""
    out = tmp_path_factory.mktemp("generated")
    prompts = out / "prompts.txt"
    prompts.write_text("In a still frame, a stop sign\na person swimming in ocean\n")
    assert main(["generate", str(TEACHER), "--vae", "toy", "--text-encoder", "toy", "--prompts", str(prompts),
                 "--samples", "2", "--vbench", "--frames", "16", "--seed", "3", "--output", str(out), "--quiet"]) == 0
    assert len(list(out.glob("*.mp4"))) == 4
    return out


def test_native_dimensions_equal_real_vbench(videos, tmp_path):
    ready = [d for d in vb.DIMENSIONS if d not in vb.NATIVE
             and all((weights_folder() / rel).is_file() for rel, _ in WEIGHTS.get(d, ()))]
    real = run_vbench(videos, tmp_path / "real", python=PYTHON, dimensions=[*vb.NATIVE, *ready], device="cpu",
                      progress=False)
    native = run_vbench(videos, tmp_path / "native", dimensions=list(vb.NATIVE), native_flickering=True,
                        progress=False)
    for dim in vb.NATIVE:
        assert real["results"][dim]["source"] == "VBench" and native["results"][dim]["source"] == "native"
        assert real["scores"][dim] == pytest.approx(native["scores"][dim], abs=1e-6), dim
        assert real["results"][dim]["videos"] == pytest.approx(native["results"][dim]["videos"], abs=1e-6), dim
    for dim, score in real["scores"].items():
        assert 0.0 <= score <= 1.0, (dim, score)
    assert real["aggregate"]["total"] is not None and real["protocol"]["versions"]["vbench_env_vbench"] != "unknown"
    print({d: round(s, 6) for d, s in real["scores"].items()}, "weights found for:", ready)
