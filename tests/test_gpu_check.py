"""The GPU check (bench/gpu_check) in its smoke mode on CPU: every part runs end to end and
records what it measured, a failing or late part is recorded and the others run, a part past
its budget is stopped with what it had saved, optional packages missing on a GPU machine
cannot stop the run at import, and the model-FLOP count behind MFU agrees with torch's own
FLOP counter."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from forcelab.bench.card import bf16_peak
from forcelab.bench.gpu_check import parts as check_parts
from forcelab.bench.gpu_check.report import REPORT_JSON, REPORT_MD
from forcelab.bench.gpu_check.runner import run_check, run_child
from forcelab.bench.train import DiTFlops
from forcelab.models import CausalDiT, DiTConfig

REPO = Path(__file__).resolve().parent.parent
OPTIONAL = ("omegaconf", "diffusers", "webdataset", "av", "wandb")   # absent from a bare CUDA image
CHECK_MODULES = ("forcelab.bench.gpu_check.__main__", "forcelab.bench.gpu_check.runner",
                 "forcelab.bench.gpu_check.parts", "forcelab.bench.gpu_check.report", "forcelab.bench.card",
                 "forcelab.bench.attention", "forcelab.bench.streaming", "forcelab.bench.train",
                 "forcelab.bench.distill")
NO_TESTS_PART = ["attention", "streaming", "training"]   # the pytest part runs in its own test below


def visible_pairs_by_enumeration(frames: int, tokens: int, chunk: int) -> int:
    """Block-causal: query token of frame i sees key token of frame j iff chunk(j) <= chunk(i)."""
    return sum(tokens * tokens for i in range(frames) for j in range(frames) if j // chunk <= i // chunk)


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    return out, run_check(out, smoke=True, parts=NO_TESTS_PART, in_process=True)


def test_smoke_check_runs_every_part_and_labels_its_numbers(smoke_report):
    out, report = smoke_report
    assert json.loads((out / REPORT_JSON).read_text()) == json.loads(json.dumps(report, default=str))
    assert report["smoke"] and "SMOKE" in report["label"] and "(SMOKE)" in (out / REPORT_MD).read_text()
    assert {name: p["status"] for name, p in report["parts"].items()} == dict.fromkeys(NO_TESTS_PART, "ok")
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["device"].startswith("CPU")
    assert Path(env["forcelab"]).resolve() == REPO          # the checkout it measured


def test_smoke_attention_counts_visible_pairs_and_checks_against_the_reference(smoke_report):
    shapes = smoke_report[1]["parts"]["attention"]["shapes"]
    s = check_parts.SMOKE_TOKENS_PER_FRAME
    train = shapes["train"]
    pairs = visible_pairs_by_enumeration(21, s, 3)
    assert train["forward_flop"] == 4 * pairs * train["head_dim"] * train["heads"] * train["batch"]
    sdpa = train["methods"]["sdpa (dense mask)"]
    assert sdpa["correct"] is True and sdpa["output_rel_error"] < train["tolerance"]
    assert sdpa["forward_tflops"] == pytest.approx(train["forward_flop"] / sdpa["forward_ms"] / 1e9)
    # the streaming layouts: every key visible
    assert shapes["stream 12f"]["visible_fraction"] == 1.0
    assert train["methods"]["forcelab (triton)"]["status"].startswith("skipped: CPU")


def test_smoke_streaming_and_training_record_their_measurements(smoke_report):
    parts = smoke_report[1]["parts"]
    stream = parts["streaming"]
    assert stream["video_frames"] == 1 + 4 * (check_parts.SMOKE_STREAM_FRAMES - 1)
    assert stream["dit_fps"] == pytest.approx(stream["video_frames"] / stream["dit_seconds"])
    vae = stream["vae"]
    assert vae == "skipped: diffusers missing" or vae["fps"] == pytest.approx(stream["video_frames"] / vae["seconds"])
    train = parts["training"]
    assert train["roles_updated"] == ["critic", "generator"] and train["model_flop_per_step"] > 0
    assert train["gradient_checkpointing"] == {"teacher": False, "generator": True, "critic": True}
    assert "mfu" not in train            # no GPU: no peak, no MFU


def test_a_failing_part_is_recorded_in_one_line_and_the_next_runs(tmp_path, monkeypatch):
    def broken(s, record, deadline, progress):
        record.data["before"] = 1
        raise RuntimeError("kernel exploded\nsecond line")

    def fine(s, record, deadline, progress):
        record.data["value"] = 42

    monkeypatch.setitem(check_parts.PARTS, "attention", broken)
    monkeypatch.setitem(check_parts.PARTS, "streaming", fine)
    report = run_check(tmp_path, smoke=True, parts=["attention", "streaming"], in_process=True)
    attention, streaming = report["parts"]["attention"], report["parts"]["streaming"]
    assert attention["status"] == "error: RuntimeError: kernel exploded" and attention["before"] == 1
    assert streaming["status"] == "ok" and streaming["value"] == 42
    assert "kernel exploded" in (tmp_path / REPORT_MD).read_text()


def test_a_spent_budget_skips_every_part_saying_why(tmp_path):
    report = run_check(tmp_path, smoke=True, budget_s=0, parts=NO_TESTS_PART, in_process=True)
    for part in report["parts"].values():
        assert part["status"].startswith("skipped: 0 s left of the overall 0 s budget")
    assert json.loads((tmp_path / REPORT_JSON).read_text())["parts"] == report["parts"]


def test_a_child_past_its_budget_is_stopped_and_keeps_what_it_saved(tmp_path):
    result = tmp_path / "part.json"
    script = textwrap.dedent(f"""
        import json, time
        open({str(result)!r}, "w").write(json.dumps({{"first": 1.5}}))
        time.sleep(60)
    """)
    status, data = run_child([sys.executable, "-c", script], result, limit=0.5, grace=0)
    assert status.startswith("timed out") and data == {"first": 1.5}
    status, data = run_child([sys.executable, "-c", "raise SystemExit(3)"], result, limit=5)
    assert status == "error: the part's process exited with code 3" and data == {}


def test_the_tests_part_runs_pytest_in_a_child_and_counts(tmp_path):
    """The whole route on the GPU machine: the CLI, a child process per part, pytest -m gpu."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "forcelab.bench.gpu_check", "--smoke", "--parts", "tests",
                           "--out", str(out), "--pytest-arg=-k", "--pytest-arg=wan_width"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tests = json.loads((out / REPORT_JSON).read_text())["parts"]["tests"]
    assert tests["status"] == "ok" and tests["files"] == check_parts.gpu_test_files()
    expected = "passed" if torch.cuda.is_available() else "skipped"
    assert tests["counts"][expected] == 1 and tests["counts"]["deselected"] >= 1
    files = len(check_parts.gpu_test_files())
    assert re.search(rf"^\[ *\d+\.\d s\] tests: pytest -m gpu over {files} files$", proc.stdout, re.M)
    assert proc.stdout.rstrip().endswith(f"- pytest: {tests['summary']} (exit 0; full log gpu_check_pytest.log)")


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0)])
def test_the_peak_is_the_cards_datasheet_figure(name, peak):
    tflops, basis = bf16_peak(name)
    assert tflops == peak and "dense bf16" in basis


def test_an_unknown_card_says_its_peak_is_assumed():
    assert "assumed" in bf16_peak("Some Future GPU")[1]


def test_pytest_counts_read_the_summary_line():
    out = "....\nFAILED tests/a.py::t - boom\n== 2 failed, 10 passed, 3 skipped, 1 error, 4 warnings in 5.1s =="
    assert check_parts.pytest_counts(out) == {"failed": 2, "passed": 10, "skipped": 3, "errors": 1, "warnings": 4}
    assert check_parts.pytest_counts("no summary") == {}


def test_optional_packages_are_not_imported_and_their_absence_is_recorded(tmp_path):
    """The modules import none of the optional packages; with them unimportable the check still
    runs: the streaming part without the VAE (saying so), the training part as an error line."""
    script = textwrap.dedent(f"""
        import json, sys
        for module in {CHECK_MODULES!r}:
            __import__(module)
        print(json.dumps(sorted(set({OPTIONAL!r}) & set(sys.modules))))
        for name in {OPTIONAL!r}:
            sys.modules[name] = None            # import fails, as where the package is missing
        from forcelab.bench.gpu_check.runner import run_check
        report = run_check({str(tmp_path)!r}, smoke=True, parts=["streaming", "training"], in_process=True)
        print(json.dumps({{k: p["status"] for k, p in report["parts"].items()}}))
        print(json.dumps(report["parts"]["streaming"].get("vae")))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()           # the progress lines between them
    imported, statuses, vae = (json.loads(line) for line in (lines[0], *lines[-2:]))
    assert imported == []
    assert statuses["streaming"] == "ok" and vae == "skipped: diffusers missing"
    assert statuses["training"].startswith("error: ") and "omegaconf" in statuses["training"]


@pytest.mark.parametrize("grad", [False, True])
def test_model_flops_agree_with_torch_flop_counter(grad):
    """DiTFlops (the MFU basis) against torch's FlopCounterMode on a bidirectional pass, whose
    attention runs as SDPA without a mask through its math backend (matmuls, which the counter
    counts: every pair is visible): the count leaves out only the embeddings, the head, the time
    modulation and the prompt's cross-attention K/V, a few percent at this size."""
    torch.manual_seed(0)
    cfg = DiTConfig.preset("wan2.1-t2v-1.3b", dim=64, ffn_dim=256, num_heads=2, num_layers=2, in_channels=4,
                           out_channels=4, text_dim=8, text_len=4, freq_dim=16)
    model = CausalDiT(cfg).requires_grad_(grad)
    x = torch.randn(2, 4, 4, 16, 16)
    context = torch.randn(2, 4, 8)
    with sdpa_kernel(SDPBackend.MATH), DiTFlops([model]) as ours, FlopCounterMode(display=False) as torch_count:
        out = model(x, torch.full((2,), 500.0), context)
        if grad:
            out.sum().backward()
    assert ours.passes == 1
    assert 0.95 < ours.flops / torch_count.get_total_flops() <= 1.0
