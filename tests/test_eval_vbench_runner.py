"""`forcelab eval vbench` end to end against a stand-in VBench: a python executable whose
`vbench` package scores every video with a fixed number and writes VBench's result format.
The real VBench runs only where FORCELAB_VBENCH_PYTHON names its interpreter."""

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from forcelab.cli import main
from forcelab.data.video import write_video
from forcelab.errors import ForcelabError
from forcelab.eval.vbench import aggregate
from forcelab.eval.vbench_runner import VBenchRunError, read_results, run_vbench

FAKE_SCORES = {"subject_consistency": 0.9, "dynamic_degree": None, "color": 0.7, "imaging_quality": 61.0}

FAKE_DIMENSION = '''
import json, os
SCORE = {score!r}

def compute_{dim}(json_dir, device, submodules_list):
    with open(os.environ["FAKE_VBENCH_LOG"], "a") as log:
        log.write("{dim}\\n")
    if os.path.exists(os.path.join(os.environ["FAKE_VBENCH_FAIL"], "{dim}")):
        raise RuntimeError("CUDA out of memory (stand-in failure)")
    entries = json.load(open(json_dir))
    rows = []
    for e in entries:
        assert e["dimension"] == ["{dim}"]
        for i, path in enumerate(e["video_list"]):
            value = (i % 2 == 0) if SCORE is None else SCORE   # dynamic_degree reports booleans
            rows.append({{"video_path": path, "video_results": value, "prompt": e["prompt_en"],
                          "aux": e.get("auxiliary_info")}})
    mean = sum(float(r["video_results"]) for r in rows) / len(rows)
    return mean, rows
'''


@pytest.fixture(scope="module")
def fake_python(tmp_path_factory):
    """An executable that behaves as a python with a (stand-in) vbench installed."""
    root = tmp_path_factory.mktemp("fake_vbench")
    pkg = root / "site" / "vbench"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = '0.0-standin'\n")
    # VBench's environment has its own torch; a stand-in one keeps each subprocess start fast
    (root / "site" / "torch.py").write_text("__version__ = '0.0-standin'\ndef device(name):\n    return name\n")
    (pkg / "utils.py").write_text("def init_submodules(dimension_list, local=False, read_frame=False):\n"
                                  "    return {d: [] for d in dimension_list}\n")
    for dim, score in FAKE_SCORES.items():
        (pkg / f"{dim}.py").write_text(FAKE_DIMENSION.format(dim=dim, score=score))
    exe = root / "python"
    exe.write_text(f"#!{sys.executable}\nimport runpy, sys\nsys.path.insert(0, {str(root / 'site')!r})\n"
                   f"sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


@pytest.fixture
def videos(tmp_path, monkeypatch):
    """Five short videos: a color prompt and a subject prompt of the suite (2 samples each)
    with generate's sidecars, and one custom prompt named only by its file."""
    folder = tmp_path / "videos"
    rng = np.random.default_rng(0)
    for prompt, samples in (("a red bicycle", 2), ("a person swimming in ocean", 2), ("a toy ball bouncing", 1)):
        for i in range(samples):
            path = write_video(folder / f"{prompt}-{i}.mp4", rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8), 8)
            if prompt != "a toy ball bouncing":
                side = {"prompt": prompt, "prompt_text": prompt + ", in detail", "sample": i, "seed": 42 + i,
                        "frames": 40, "batch": 2, "seconds_per_batch": 2.0, "fps": 8,
                        "vbench_suite": {"prompts_file": "all_dimension_aug_wan2.1_seed42.txt", "extended": True}}
                path.with_suffix(".json").write_text(json.dumps(side))
    monkeypatch.setenv("FAKE_VBENCH_LOG", str(tmp_path / "calls.log"))
    monkeypatch.setenv("FAKE_VBENCH_FAIL", str(tmp_path / "fail"))
    (tmp_path / "fail").mkdir()
    return folder


def calls(folder):
    log = folder.parent / "calls.log"
    return log.read_text().split() if log.exists() else []


def test_runs_each_dimension_resumes_after_a_failure(fake_python, videos, tmp_path):
    out = tmp_path / "out"
    dims = ["subject_consistency", "dynamic_degree", "imaging_quality", "color", "temporal_flickering"]
    (tmp_path / "fail" / "color").write_text("")
    with pytest.raises(VBenchRunError, match=r"\['color'\].*run the same command again"):
        run_vbench(videos, out, python=fake_python, dimensions=dims, device="cpu", native_flickering=True,
                   progress=False)
    first = json.loads((out / "vbench.json").read_text())
    assert sorted(first["failed"]) == ["color"] and "CUDA out of memory" in (out / "logs" / "color.log").read_text()
    assert set(first["scores"]) == {"subject_consistency", "dynamic_degree", "imaging_quality", "temporal_flickering"}
    assert calls(videos) == ["subject_consistency", "dynamic_degree", "imaging_quality", "color"]

    (tmp_path / "fail" / "color").unlink()
    result = run_vbench(videos, out, python=fake_python, dimensions=dims, device="cpu", native_flickering=True,
                        progress=False)
    assert calls(videos)[4:] == ["color"]                         # finished dimensions were not re-run
    scores = result["scores"]
    assert scores["subject_consistency"] == pytest.approx(0.9) and scores["color"] == pytest.approx(0.7)
    assert scores["imaging_quality"] == pytest.approx(0.61)       # MUSIQ's 0..100 brought to 0..1
    assert result["aggregate"] == aggregate(scores) and "scene" in result["aggregate"]["missing"]
    assert not result["failed"] and result["results"]["temporal_flickering"]["native"]
    # a changed set of videos is scored again; a result of unknown origin is left alone
    (videos / "a toy ball bouncing-1.mp4").write_bytes((videos / "a toy ball bouncing-0.mp4").read_bytes())
    run_vbench(videos, out, python=fake_python, dimensions=["subject_consistency"], device="cpu", progress=False)
    assert calls(videos)[5:] == ["subject_consistency"]
    (videos / "a toy ball bouncing-1.mp4").unlink()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "color_eval_results.json").write_text(json.dumps({"color": [0.5, []]}))
    with pytest.raises(ForcelabError, match="not written by forcelab"):
        run_vbench(videos, foreign, python=fake_python, dimensions=["color"], device="cpu", progress=False)

    # which videos each dimension saw: the suite's prompts on their own dimensions only,
    # the custom prompt on dimensions that need no suite metadata
    sc = json.loads((out / "subject_consistency_info.json").read_text())
    assert sorted(e["prompt_en"] for e in sc) == ["a person swimming in ocean", "a toy ball bouncing"]
    color = json.loads((out / "color_info.json").read_text())
    assert [e["prompt_en"] for e in color] == ["a red bicycle"] and len(color[0]["video_list"]) == 2
    assert color[0]["auxiliary_info"] == {"color": {"color": "red"}}
    assert result["skipped_no_videos"] == [] and result["dimensions"] == [
        "subject_consistency", "temporal_flickering", "dynamic_degree", "imaging_quality", "color"]
    # temporal_flickering (a standard dimension of neither suite prompt) scores the custom one only
    assert list(result["results"]["temporal_flickering"]["videos"]) == ["a toy ball bouncing-0.mp4"]

    p = result["protocol"]
    assert p["mode"] == "VBench" and p["prompts_file"] == "all_dimension_aug_wan2.1_seed42.txt"
    assert p["extended_prompts"] and p["seeds"] == [42, 43] and p["samples_per_prompt"] == 2
    assert p["versions"]["vbench_env_vbench"] == "0.0-standin" and "forcelab" in p["versions"]


def test_results_file_in_vbench_format(tmp_path):
    path = tmp_path / "x_eval_results.json"
    path.write_text(json.dumps({"motion_smoothness": [0.98, [{"video_path": "a-0.mp4", "video_results": 0.97},
                                                              {"video_path": "a-1.mp4", "video_results": 0.99}]]}))
    mean, rows = read_results(path, "motion_smoothness")
    assert mean == 0.98 and [r["video_results"] for r in rows] == [0.97, 0.99]
    path.write_text("{}")
    with pytest.raises(ForcelabError, match="not a VBench result"):
        read_results(path, "motion_smoothness")


def test_long_mode_scores_clips_and_averages_per_video(fake_python, videos, tmp_path):
    out = tmp_path / "long"
    result = run_vbench(videos, out, python=fake_python, dimensions=["dynamic_degree", "temporal_flickering"],
                        long=True, device="cpu", native_flickering=True, progress=False)
    assert result["protocol"]["mode"] == "VBench-Long"
    clips = sorted(p.name for p in (out / "clips" / "2s").glob("a red bicycle-0_*.mp4"))
    assert clips == ["a red bicycle-0_000.mp4", "a red bicycle-0_001.mp4", "a red bicycle-0_002.mp4"]  # 40 = 16+16+(24..40)
    info = json.loads((out / "dynamic_degree_info.json").read_text())
    assert all(len(e["video_list"]) % 3 == 0 for e in info)
    # the stand-in says True, False, True, ... along each prompt's clip list: a long video
    # scores the mean of its 3 clips, the run the mean over long videos
    per_video = result["results"]["dynamic_degree"]["videos"]
    assert per_video == pytest.approx({"a person swimming in ocean-0.mp4": 2 / 3, "a person swimming in ocean-1.mp4": 1 / 3,
                                       "a toy ball bouncing-0.mp4": 2 / 3})
    assert result["scores"]["dynamic_degree"] == pytest.approx(5 / 9)


def test_clear_errors_for_a_wrong_python(videos, tmp_path, capsys):
    with pytest.raises(ForcelabError, match="not found"):
        run_vbench(videos, tmp_path / "o", python=tmp_path / "no" / "python", dimensions=["color"])
    with pytest.raises(ForcelabError, match="not an executable"):
        run_vbench(videos, tmp_path / "o", python=tmp_path, dimensions=["color"])
    with pytest.raises(ForcelabError, match="cannot import vbench"):
        run_vbench(videos, tmp_path / "o", python=sys.executable, dimensions=["color"])   # ours has no VBench
    with pytest.raises(ForcelabError, match="--vbench-python is needed"):
        run_vbench(videos, tmp_path / "o", dimensions=["color"])
    assert main(["eval", "vbench", str(videos), "--vbench-python", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "--vbench-python" in capsys.readouterr().err
    assert main(["eval", "vbench", str(videos), "--dimensions", "flicker", "--quiet"]) == 2


def test_native_flickering_needs_no_vbench(videos, tmp_path):
    assert main(["eval", "vbench", str(videos), "--dimensions", "temporal_flickering", "--native-flickering",
                 "--out", str(tmp_path / "tf"), "--quiet"]) == 0
    result = json.loads((tmp_path / "tf" / "vbench.json").read_text())
    assert 0 < result["scores"]["temporal_flickering"] < 1 and result["aggregate"]["semantic"] is None
    only_color = tmp_path / "color_only"                          # a suite prompt of another dimension only
    only_color.mkdir()
    (only_color / "a red bicycle-0.mp4").write_bytes((videos / "a red bicycle-0.mp4").read_bytes())
    with pytest.raises(ForcelabError, match="no VBench dimension scored"):
        run_vbench(only_color, dimensions=["temporal_flickering"], native_flickering=True, progress=False)


@pytest.mark.skipif(not os.environ.get("FORCELAB_VBENCH_PYTHON"), reason="the real VBench is not installed "
                    "(set FORCELAB_VBENCH_PYTHON to its python)")
def test_real_vbench_temporal_flickering_equals_native(videos, tmp_path):
    python = os.environ["FORCELAB_VBENCH_PYTHON"]
    theirs = run_vbench(videos, tmp_path / "real", python=python, dimensions=["temporal_flickering"],
                        device="cpu", progress=False)
    ours = run_vbench(videos, tmp_path / "native", dimensions=["temporal_flickering"], native_flickering=True,
                      progress=False)
    assert theirs["scores"]["temporal_flickering"] == pytest.approx(ours["scores"]["temporal_flickering"], abs=1e-4)
    for name, score in ours["results"]["temporal_flickering"]["videos"].items():
        assert theirs["results"]["temporal_flickering"]["videos"][name] == pytest.approx(score, abs=1e-4)
    assert Path(tmp_path / "real" / "temporal_flickering_eval_results.json").is_file()
