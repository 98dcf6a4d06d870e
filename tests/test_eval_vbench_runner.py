"""`forcelab eval vbench` end to end against a stand-in VBench: this interpreter, started by a
two-line shell wrapper that puts a folder holding a stand-in `vbench` package on PYTHONPATH, as
a VBench environment would have it installed. The stand-in scores every video with a fixed
number and writes VBench's result format. The real VBench: tests/test_eval_vbench_real.py."""

import json
import re
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from forcelab.cli import main
from forcelab.data.video import write_video
from forcelab.errors import ForcelabError
from forcelab.eval.vbench import aggregate
from forcelab.eval.vbench_runner import DRIVER, WEIGHTS, VBenchRunError, read_results, run_vbench

FAKE_SCORES = {"subject_consistency": 0.9, "dynamic_degree": None, "color": 0.7, "imaging_quality": 61.0,
               "temporal_flickering": 0.95}

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
    (pkg / "utils.py").write_text("import os\n"
                                  "def init_submodules(dimension_list, local=False, read_frame=False):\n"
                                  "    assert local, 'weights must come from the cache folder'\n"
                                  "    cache = os.environ['VBENCH_CACHE_DIR']\n"
                                  "    assert os.path.isdir(cache)\n"
                                  "    assert os.environ['TORCH_HOME'] == os.path.join(cache, 'torch')\n"
                                  "    return {d: [] for d in dimension_list}\n")
    for dim, score in FAKE_SCORES.items():
        (pkg / f"{dim}.py").write_text(FAKE_DIMENSION.format(dim=dim, score=score))
    # the interpreter runs the driver as a script, exactly as a VBench venv's python would
    exe = root / "python"
    exe.write_text(f"#!/bin/sh\nPYTHONPATH={str(root / 'site')!r} exec {sys.executable!r} \"$@\"\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


@pytest.fixture
def cache(tmp_path):
    """A VBench cache folder holding (empty stand-ins of) every weight file."""
    folder = tmp_path / "cache"
    for rel, _ in {w for files in WEIGHTS.values() for w in files}:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(b"")
    return folder


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


def test_runs_each_dimension_resumes_after_a_failure(fake_python, videos, cache, tmp_path):
    out = tmp_path / "out"
    dims = ["subject_consistency", "dynamic_degree", "imaging_quality", "color", "temporal_flickering"]
    (tmp_path / "fail" / "color").write_text("")
    with pytest.raises(VBenchRunError, match=r"\['color'\].*run the same command again"):
        run_vbench(videos, out, python=fake_python, dimensions=dims, device="cpu", cache=cache,
                   native_flickering=True, progress=False)
    first = json.loads((out / "vbench.json").read_text())
    assert sorted(first["failed"]) == ["color"]
    assert "CUDA out of memory" in (out / "vbench" / "logs" / "color.log").read_text()
    assert set(first["scores"]) == {"subject_consistency", "dynamic_degree", "imaging_quality", "temporal_flickering"}
    assert calls(videos) == ["subject_consistency", "dynamic_degree", "imaging_quality", "color"]

    (tmp_path / "fail" / "color").unlink()
    result = run_vbench(videos, out, python=fake_python, dimensions=dims, device="cpu", cache=cache,
                        native_flickering=True, progress=False)
    assert calls(videos)[4:] == ["color"]                         # finished dimensions were not re-run
    scores = result["scores"]
    assert scores["subject_consistency"] == pytest.approx(0.9) and scores["color"] == pytest.approx(0.7)
    assert scores["imaging_quality"] == pytest.approx(0.61)       # MUSIQ's 0..100 brought to 0..1
    assert result["aggregate"] == aggregate(scores) and "scene" in result["aggregate"]["missing"]
    assert not result["failed"] and result["results"]["temporal_flickering"]["native"]
    # a changed set of videos is scored again; a result of unknown origin is left alone
    (videos / "a toy ball bouncing-1.mp4").write_bytes((videos / "a toy ball bouncing-0.mp4").read_bytes())
    run_vbench(videos, out, python=fake_python, dimensions=["subject_consistency"], device="cpu", cache=cache,
               progress=False)
    assert calls(videos)[5:] == ["subject_consistency"]
    (videos / "a toy ball bouncing-1.mp4").unlink()
    foreign = tmp_path / "foreign"
    (foreign / "vbench").mkdir(parents=True)
    (foreign / "vbench" / "color_eval_results.json").write_text(json.dumps({"color": [0.5, []]}))
    with pytest.raises(ForcelabError, match="not written by forcelab"):
        run_vbench(videos, foreign, python=fake_python, dimensions=["color"], device="cpu", cache=cache,
                   progress=False)

    # which videos each dimension saw: the suite's prompts on their own dimensions only,
    # the custom prompt on dimensions that need no suite metadata
    sc = json.loads((out / "vbench" / "subject_consistency_info.json").read_text())
    assert sorted(e["prompt_en"] for e in sc) == ["a person swimming in ocean", "a toy ball bouncing"]
    color = json.loads((out / "vbench" / "color_info.json").read_text())
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


def test_long_mode_scores_clips_and_averages_per_video(fake_python, videos, cache, tmp_path):
    out = tmp_path / "long"
    result = run_vbench(videos, out, python=fake_python, dimensions=["dynamic_degree", "temporal_flickering"],
                        long=True, device="cpu", cache=cache, native_flickering=True, progress=False)
    assert result["protocol"]["mode"] == "VBench-Long"
    clips = sorted(p.name for p in (out / "vbench" / "clips" / "2s").glob("a red bicycle-0_*.mp4"))
    assert clips == ["a red bicycle-0_000.mp4", "a red bicycle-0_001.mp4", "a red bicycle-0_002.mp4"]  # 40 = 16+16+(24..40)
    info = json.loads((out / "vbench" / "dynamic_degree_info.json").read_text())
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


def test_driver_imports_vbench_not_forcelabs_own_file(fake_python, videos, cache, tmp_path):
    """The driver runs as a script from forcelab/eval/, beside forcelab's own vbench.py; the
    VBench it loads is the one the interpreter has installed (here: on its PYTHONPATH)."""
    assert (DRIVER.parent / "vbench.py").is_file()                    # the file that used to shadow VBench
    result = run_vbench(videos, tmp_path / "o", python=fake_python, dimensions=["subject_consistency"],
                        device="cpu", cache=cache, progress=False)
    versions = result["protocol"]["versions"]
    assert versions["vbench_env_vbench"] == "0.0-standin"
    assert Path(versions["vbench_env_vbench_file"]) == fake_python.parent / "site" / "vbench" / "__init__.py"
    assert result["scores"]["subject_consistency"] == pytest.approx(0.9)


def test_missing_weights_are_named_before_anything_runs(fake_python, videos, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty_cache"
    empty.mkdir()
    dims = ["subject_consistency", "background_consistency", "color", "temporal_flickering"]
    with pytest.raises(ForcelabError) as e:
        run_vbench(videos, tmp_path / "o", python=fake_python, dimensions=dims, device="cpu", cache=empty,
                   progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("VBench weights missing (5 file(s))")
    for rel in ("dino_model/dino_vitbase16_pretrain.pth", "dino_model/facebookresearch_dino_main/hubconf.py",
                "torch/hub/checkpoints/dino_vitbase16_pretrain.pth",
                "clip_model/ViT-B-32.pt", "grit_model/grit_b_densecap_objectdet.pth"):
        assert str(empty / rel) in msg
    assert "temporal_flickering" not in msg and calls(videos) == []     # nothing ran
    # VBench's own default folder is used when none is given (and named when empty)
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(empty))
    with pytest.raises(ForcelabError, match=re.escape(str(empty / "clip_model" / "ViT-B-32.pt"))):
        run_vbench(videos, tmp_path / "o", python=fake_python, dimensions=["background_consistency"], progress=False)
    # temporal_flickering needs no weights: it runs with the empty folder
    result = run_vbench(videos, tmp_path / "o", python=fake_python, dimensions=["temporal_flickering"],
                        device="cpu", cache=empty, progress=False)
    assert result["results"]["temporal_flickering"]["source"] == "VBench"
    assert main(["eval", "vbench", str(videos), "--vbench-python", str(fake_python), "--vbench-cache", str(empty),
                 "--dimensions", "color", "--quiet"]) == 2
    assert "grit_b_densecap_objectdet.pth" in capsys.readouterr().err
