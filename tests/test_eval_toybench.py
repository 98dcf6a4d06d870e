"""ToyBench against the toy world's ground truth: clean clips score at their best, and each
corruption drops the metric it should while the others stay near their ground-truth value."""

import copy
import dataclasses
import json
import re

import numpy as np
import pytest

from forcelab.cli import main
from forcelab.data.toyworld import PALETTE, ToyWorld, _fold, make_caption
from forcelab.data.video import write_video
from forcelab.errors import ForcelabError
from forcelab.eval.toybench import METRICS, continuation, score_video, score_videos
from forcelab.eval.toydetect import detect_balls, detect_frames, touching
from forcelab.pipeline import toybench_stage

T = 48
SEEDS = (0, 1, 2)   # one-, two- and three-ball scenes among them
WORLD = ToyWorld()
UNIT = [m for m in METRICS if not m.startswith("fidelity_")]   # metrics in 0..1 (the others: dB)


def frames_of(video):
    return video.permute(0, 2, 3, 1).numpy()


def corrupt(clip, kind, rng):
    """Ground-truth frames of `clip` with one defect."""
    scene, frames = clip.scene, frames_of(clip.video)
    if kind == "noise":
        return np.clip(frames + rng.normal(0, 20, frames.shape), 0, 255).astype(np.uint8)
    if kind == "frozen":                              # the second half repeats one frame
        out = frames.copy()
        out[T // 2:] = frames[T // 2]
        return out
    if kind == "swap":                                # the first ball changes colour half way
        other = next(c for c in PALETTE if c not in scene.colors)
        swapped = copy.deepcopy(scene)
        swapped.colors[0] = other
        out = frames.copy()
        out[T // 2:] = frames_of(WORLD.render(swapped, clip.positions[T // 2:]))
        return out
    if kind == "teleport":                            # every 8 frames all balls jump elsewhere
        pos = clip.positions.copy()
        for k in range(8, T, 8):
            size = np.array([WORLD.config.width, WORLD.config.height])
            start = scene.radius[:, None] + rng.uniform(size=(len(scene.colors), 2)) * (size - 2 * scene.radius[:, None])
            pos[k:k + 8] = WORLD.trajectory(dataclasses.replace(scene, pos0=start), min(8, T - k), start=k)[0]
        return frames_of(WORLD.render(scene, pos))
    if kind == "slowing":                             # time runs slower and slower: speed 1x -> 0.25x
        t = np.arange(T, dtype=np.float64)
        tau = t - 0.75 * t ** 2 / (2 * T)
        r = scene.radius[:, None]
        hi = np.array([WORLD.config.width, WORLD.config.height]) - r
        pos = _fold(scene.pos0, scene.vel, r * np.ones(2), hi, tau)[0]
        return frames_of(WORLD.render(scene, pos))
    raise ValueError(kind)


@pytest.fixture(scope="module")
def scores():
    """{seed: {"gt" | corruption: score_video dict}} with captions that name the true speed."""
    rng = np.random.default_rng(0)
    out = {}
    for seed in SEEDS:
        clip = WORLD.clip(seed, frames=T)
        caption = make_caption(clip.scene.colors, clip.scene.speed)
        out[seed] = {"gt": score_video(frames_of(clip.video), caption)}
        for kind in ("noise", "frozen", "swap", "teleport", "slowing"):
            out[seed][kind] = score_video(corrupt(clip, kind, rng), caption)
    return out


def test_ground_truth_scores_at_best(scores):
    for seed in SEEDS:
        gt = scores[seed]["gt"]
        assert gt["fidelity_psnr"] >= 45.0, seed                     # cap 60 dB; occlusions cost a little
        for m in UNIT:
            assert gt[m] >= 0.98, (seed, m, gt[m])
        assert gt["adherence"] == 1.0 and gt["identity"] == 1.0 and gt["dynamics"] >= 0.99
        for m in UNIT:
            assert gt[f"{m}_drift"] >= -0.01, (seed, m)
        assert gt["fidelity_psnr_drift"] >= -1.5
        assert [f"physics@{b}" in gt for b in range(4)] == [True, True, True, False]   # 48 frames / 16


def near(a, b, tol):
    return abs(a - b) <= tol


@pytest.mark.parametrize("seed", SEEDS)
def test_corruptions_drop_their_metric_only(scores, seed):
    gt, s = scores[seed]["gt"], scores[seed]
    # noise -> fidelity and stray pixels; detection and motion still fine
    assert s["noise"]["fidelity_psnr"] < 25.0 and s["noise"]["clean_pixels"] < gt["clean_pixels"] - 0.1
    for m, tol in (("adherence", 0.02), ("identity", 0.03), ("physics", 0.05), ("dynamics", 0.03)):
        assert near(s["noise"][m], gt[m], tol), ("noise", m)
    # frozen second half -> dynamics (and its drift)
    assert s["frozen"]["dynamics"] < gt["dynamics"] - 0.3 and s["frozen"]["dynamics_drift"] < -0.2
    # colour swap half way -> adherence and identity
    assert s["swap"]["adherence"] < gt["adherence"] - 0.15 and s["swap"]["identity"] <= 0.6
    for m in ("physics", "dynamics"):
        assert near(s["swap"][m], gt[m], 0.03), ("swap", m)
    # teleporting balls -> physics
    assert s["teleport"]["physics"] < gt["physics"] - 0.1
    # slowing down over time -> the drift slope of dynamics
    assert s["slowing"]["dynamics_drift"] < -0.1
    for m in ("adherence", "identity", "physics"):
        assert near(s["slowing"][m], gt[m], 0.03), ("slowing", m)
    # what does not concern a corruption stays near ground truth
    for kind in ("frozen", "swap", "teleport", "slowing"):
        assert s[kind]["fidelity_psnr"] >= 40.0 and s[kind]["clean_pixels"] >= gt["clean_pixels"] - 0.01, kind
    for kind in ("frozen", "teleport"):
        for m in ("adherence", "identity"):
            assert near(s[kind][m], gt[m], 0.03), (kind, m)


def test_detect_balls_finds_positions_colours_and_radii():
    clip = WORLD.clip(2, frames=24)
    errors = []
    for t, balls in enumerate(detect_frames(frames_of(clip.video), order=clip.scene.colors)):
        assert sorted(b.color for b in balls) == sorted(clip.scene.colors)
        if touching(balls):
            continue
        for color, x, y, radius in balls:
            i = clip.scene.colors.index(color)
            errors.append(np.hypot(x - clip.positions[t, i, 0], y - clip.positions[t, i, 1]))
            assert radius == pytest.approx(clip.scene.radius[i], abs=0.15)
    assert errors and np.median(errors) < 0.05 and max(errors) < 0.3
    one = detect_balls(frames_of(clip.video)[0])                  # the single-frame API
    assert {b.color for b in one} == set(clip.scene.colors) and all(len(tuple(b)) == 4 for b in one)
    blank = np.broadcast_to(np.array(WORLD.config.background, np.uint8), (32, 32, 3)).copy()
    assert detect_balls(blank) == []


def test_continuation_and_score_videos_summary():
    a, b = WORLD.clip(1, frames=32), WORLD.clip(5, frames=32)
    fa, fb = frames_of(a.video), frames_of(b.video)
    assert continuation(fa[0], fa[0]) == 1.0
    assert continuation(fb[0], fa[0]) < 0.5                        # another scene's first frame
    s = score_video(fa, a.scene.caption, first_frame=fa[0])
    assert s["continuation"] == 1.0
    summary = score_videos([fa, fb[:16]], [a.scene.caption, b.scene.caption], bucket_frames=16)
    per_video = summary["videos"]
    for m in METRICS:
        assert summary["aggregate"][m] == pytest.approx(np.mean([v[m] for v in per_video]))
        assert summary["spread"][m]["n"] == 2
    assert summary["buckets"]["dynamics"]["n"] == [2, 1]           # the shorter video has one bucket
    with pytest.raises(ForcelabError, match="names no toy ball"):
        score_video(fa, "a cat on a sofa")
    with pytest.raises(ForcelabError, match=r"uint8 \[T, H, W, 3\]"):
        score_video(a.video, a.scene.caption)                     # [T, 3, H, W] is refused


def test_fidelity_adherent_is_nan_without_an_adherent_frame_and_left_out_of_the_summary():
    clip = WORLD.clip(0, frames=16)
    f = frames_of(clip.video)
    absent = next(c for c in PALETTE if c not in clip.scene.colors)
    summary = score_videos([f, f], [clip.scene.caption, f"a {absent} ball"])     # no frame shows that ball
    right, wrong = summary["videos"]
    assert right["fidelity_adherent"] == right["fidelity_psnr"] and np.isnan(wrong["fidelity_adherent"])
    assert wrong["fidelity_psnr"] == right["fidelity_psnr"]            # the same frames, the same re-render
    spread = summary["spread"]["fidelity_adherent"]
    assert (spread["n"], spread["missing"]) == (1, 1)
    assert summary["aggregate"]["fidelity_adherent"] == right["fidelity_adherent"]


def write_toy_videos(folder, seeds, frames=32):
    for seed in seeds:
        clip = WORLD.clip(seed, frames=frames)
        path = write_video(folder / f"{seed:04d}-toy-0.mp4", frames_of(clip.video), 8.0)
        side = {"video": path.name, "prompt": clip.scene.caption, "prompt_text": clip.scene.caption, "fps": 8.0,
                "seed": seed, "sample": 0, "frames": frames, "batch": 1, "seconds_per_batch": 0.25}
        path.with_suffix(".json").write_text(json.dumps(side))


def test_cli_toybench_reads_generate_output(tmp_path):
    videos = tmp_path / "videos"
    write_toy_videos(videos, (0, 1))
    (videos / "odd.mp4").write_bytes((videos / "0000-toy-0.mp4").read_bytes())   # no sidecar: skipped
    out = tmp_path / "out"
    assert main(["eval", "toybench", str(videos), "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "toybench.json").read_text())
    assert result["kind"] == "toybench" and len(result["videos"]) == 2 and "odd.mp4" in result["skipped"]
    agg = result["aggregate"]
    # through the mp4 codec (chroma subsampling of 32x32 frames) ground truth stays near best
    assert agg["adherence"] >= 0.98 and agg["identity"] >= 0.98 and agg["physics"] >= 0.95
    assert agg["dynamics"] >= 0.95 and agg["fidelity_psnr"] >= 33.0
    assert result["speed_fps"] == pytest.approx(32 / 0.25)
    assert set(result["spread"]["physics"]) >= {"mean", "std", "ci95", "min", "max", "n"}
    assert len(result["buckets"]["physics"]["mean"]) == 2
    assert (out / "toybench.html").is_file() and (out / "toybench.md").is_file()
    (out / "toybench.json").write_text("{}")                       # not ours any more: refuse to overwrite
    assert main(["eval", "toybench", str(videos), "--out", str(out), "--quiet"]) == 2
    assert main(["eval", "toybench", str(tmp_path / "none"), "--quiet"]) == 2


def test_toybench_stage_keeps_a_current_result_and_rescores_one_that_predates_a_metric(tmp_path):
    videos = tmp_path / "videos"
    write_toy_videos(videos, (0,), frames=8)
    first = toybench_stage(videos, bucket_frames=8)
    assert set(METRICS) <= set(first["metrics"]) and "fidelity_adherent" in first["aggregate"]
    kept = videos / "toybench.json"
    kept.write_text(json.dumps({**first, "name": "kept"}))
    assert toybench_stage(videos, bucket_frames=8)["name"] == "kept"            # current: not scored again
    old = {**first, "name": "old", "metrics": [m for m in first["metrics"] if m != "fidelity_adherent"],
           "aggregate": {k: v for k, v in first["aggregate"].items() if k != "fidelity_adherent"}}
    kept.write_text(json.dumps(old))
    again = toybench_stage(videos, bucket_frames=8)
    assert again["name"] != "old" and again["aggregate"]["fidelity_adherent"] == first["aggregate"]["fidelity_adherent"]


def test_spread_and_slope_by_hand():
    from forcelab.eval import stats

    s = stats.spread([1.0, 2.0, 3.0, float("nan")])
    assert (s["mean"], s["std"], s["n"], s["missing"], s["min"], s["max"]) == (2.0, 1.0, 3, 1, 1.0, 3.0)
    assert s["ci95"] == pytest.approx(4.303 / np.sqrt(3))          # Student t, 2 degrees of freedom
    assert stats.slope([0.9, 0.7, 0.5, 0.3]) == pytest.approx(-0.2)
    assert stats.slope([1.0, float("nan"), 3.0]) == pytest.approx(1.0) and stats.slope([5.0]) == 0.0


@pytest.mark.parametrize("sidecar, match", [
    ("[1, 2]", "a sidecar is a JSON object .*got list"),
    ('{"prompt": "x", "fps": "fast"}', "'fps' must be a positive number, got 'fast'"),
    ('{"prompt": "x", "fps": -8}', "'fps' must be a positive number, got -8"),
    ('{"prompt": "x", "frames": 2.5}', "'frames' must be a positive whole number, got 2.5"),
    ('{"prompt": ["x"]}', "'prompt' must be text, got list"),
    (b"\xff\xfe\x00", "not valid UTF-8 JSON"),
])
def test_a_malformed_sidecar_is_one_line_naming_it(tmp_path, capsys, sidecar, match):
    videos = tmp_path / "videos"
    write_toy_videos(videos, (0,), frames=8)
    side = videos / "0000-toy-0.json"
    side.write_bytes(sidecar if isinstance(sidecar, bytes) else sidecar.encode())
    assert main(["eval", "toybench", str(videos), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(side) in err[0]
    assert re.search(match, err[0]), err[0]


@pytest.mark.parametrize("argv, match", [
    (["VIDEOS", "--suite", "quick"], "VIDEOS_DIR .* scores existing videos, --suite trains"),
    (["VIDEOS", "--max-steps", "5"], "--max-steps apply to --suite full|quick only"),
    (["VIDEOS", "--seeds", "2", "--first-seed", "4"], "--seeds, --first-seed apply to --suite"),
    (["VIDEOS", "--recipes", "teacher"], "--recipes apply to --suite"),
    (["--suite", "quick", "--first-seed", "-1"], "--first-seed: .*from 0 to 2\\^63 - 1"),
    (["--suite", "quick", "--first-seed", str(2**63 - 1), "--seeds", "2"], "--first-seed \\+ --seeds - 1 must be"),
    (["--suite", "quick", "--max-steps", "0"], "--max-steps: .*>= 1, got '0'"),
    (["--suite", "quick", "--seeds", "0"], "--seeds: .*>= 1"),
    (["--suite", "quick", "--bucket-frames", "4"], "--bucket-frames applies to VIDEOS_DIR scoring"),
    (["VIDEOS", "--bucket-frames", "0"], "--bucket-frames: .*>= 1"),
])
def test_toybench_flags_of_the_other_mode_or_out_of_range_are_refused_before_any_work(tmp_path, capsys, monkeypatch,
                                                                                       argv, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "VIDEOS").mkdir()
    assert main(["eval", "toybench", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[0]), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["VIDEOS"]      # nothing trained or written
