"""VBench pieces that need no VBench: the official aggregation, native temporal_flickering,
the bundled prompt suite (and generate's selection of it), VBench-Long clip splitting."""

import argparse
import json

import numpy as np
import pytest

from forcelab.errors import ForcelabError
from forcelab.eval import vbench_long
from forcelab.eval.vbench import aggregate, temporal_flickering, temporal_flickering_files
from forcelab.generate.vbench_suite import SUITE_DIR, select_prompts

FULL = {"subject_consistency": 0.95, "background_consistency": 0.96, "temporal_flickering": 0.97,
        "motion_smoothness": 0.98, "dynamic_degree": 0.6, "aesthetic_quality": 0.6, "imaging_quality": 0.65,
        "object_class": 0.8, "multiple_objects": 0.5, "human_action": 0.9, "color": 0.85,
        "spatial_relationship": 0.7, "scene": 0.4, "appearance_style": 0.22, "temporal_style": 0.24,
        "overall_consistency": 0.26}


def test_aggregate_full_set_by_hand():
    # VBench's scripts/constant.py, written out: (s - Min) / (Max - Min) * weight
    quality = ((0.95 - 0.1462) / (1 - 0.1462) + (0.96 - 0.2615) / (1 - 0.2615) + (0.97 - 0.6293) / (1 - 0.6293)
               + (0.98 - 0.706) / (0.9975 - 0.706) + 0.5 * 0.6 + 0.6 + 0.65) / 6.5
    semantic = (0.8 + 0.5 + 0.9 + 0.85 + 0.7 + 0.4 / 0.8222 + (0.22 - 0.0009) / (0.2855 - 0.0009)
                + 0.24 / 0.364 + 0.26 / 0.364) / 9
    out = aggregate(FULL)
    assert out["quality"] == pytest.approx(100 * quality, abs=1e-9)
    assert out["semantic"] == pytest.approx(100 * semantic, abs=1e-9)
    assert out["total"] == pytest.approx(100 * (4 * quality + semantic) / 5, abs=1e-9)
    assert out["missing"] == [] and out["partial"] is False
    assert out["normalized"]["dynamic_degree"] == pytest.approx(0.3)


def test_aggregate_subsets_by_hand():
    q = aggregate({"subject_consistency": 0.95, "dynamic_degree": 0.6})
    by_hand = ((0.95 - 0.1462) / 0.8538 + 0.5 * 0.6) / 1.5
    assert q["quality"] == pytest.approx(100 * by_hand) and q["semantic"] is None
    assert q["total"] == pytest.approx(100 * by_hand) and len(q["missing"]) == 14 and q["partial"]
    s = aggregate({"scene": 0.4, "color": 0.85})
    assert s["quality"] is None and s["semantic"] == pytest.approx(100 * (0.4 / 0.8222 + 0.85) / 2)
    mixed = aggregate({"temporal_flickering": 0.97, "overall_consistency": 0.26})
    q1, s1 = (0.97 - 0.6293) / 0.3707, 0.26 / 0.364
    assert mixed["total"] == pytest.approx(100 * (4 * q1 + s1) / 5)
    assert "temporal_flickering" not in mixed["missing"] and "scene" in mixed["missing"]
    with pytest.raises(ForcelabError, match="divide it by 100"):
        aggregate({"imaging_quality": 65.0})
    with pytest.raises(ForcelabError, match="unknown VBench dimension"):
        aggregate({"subject consistency": 0.9})


def test_temporal_flickering_matches_vbench_definition_by_hand():
    # 3 frames of 2x2 RGB: pair 1 differs by 10 on 11 values and 40 on one; pair 2 by 30 on one
    f0 = np.full((2, 2, 3), 10, np.uint8)
    f1 = np.full((2, 2, 3), 20, np.uint8)
    f1[0, 1, 2] = 50
    f2 = np.full((2, 2, 3), 20, np.uint8)
    mae = [(11 * 10 + 40) / 12, 30 / 12]
    assert temporal_flickering(np.stack([f0, f1, f2])) == pytest.approx((255 - np.mean(mae)) / 255, abs=1e-7)
    assert temporal_flickering(np.stack([f0, f0])) == 1.0
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (5, 3, 4, 3), dtype=np.uint8)
    pairs = [np.mean([abs(float(video[t + 1][i, j, c]) - float(video[t][i, j, c]))
                      for i in range(3) for j in range(4) for c in range(3)]) for t in range(4)]
    assert temporal_flickering(video) == pytest.approx((255 - np.mean(pairs)) / 255, abs=1e-6)
    with pytest.raises(ForcelabError, match="T >= 2"):
        temporal_flickering(video[:1])


def test_temporal_flickering_files_in_vbench_format(tmp_path):
    from forcelab.data.video import read_video, write_video

    rng = np.random.default_rng(1)
    paths = [write_video(tmp_path / f"v-{i}.mp4", rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), 8) for i in range(2)]
    mean, rows = temporal_flickering_files(paths)
    per_video = [temporal_flickering(read_video(p).permute(0, 2, 3, 1).numpy()) for p in paths]
    assert [r["video_path"] for r in rows] == [str(p) for p in paths]
    assert [r["video_results"] for r in rows] == pytest.approx(per_video) and mean == pytest.approx(np.mean(per_video))


def test_prompt_suite_selection():
    info_rows = json.loads((SUITE_DIR / "VBench_full_info.json").read_text())
    assert len(info_rows) == 946 and (SUITE_DIR / "LICENSE").is_file()
    names, texts, info = select_prompts()
    assert len(names) == len({r["prompt_en"] for r in info_rows}) == 944 and texts == names
    assert info["prompts_file"] == "all_dimension.txt" and info["extended"] is False and info["dimensions"] == "all"
    flicker = [r["prompt_en"] for r in info_rows if "temporal_flickering" in r["dimension"]]
    names, texts, info = select_prompts(["temporal_flickering"], extended=True)
    assert names == list(dict.fromkeys(flicker)) and info["extended"] and info["dimensions"] == ["temporal_flickering"]
    lines = (SUITE_DIR / "all_dimension.txt").read_text().splitlines()
    ext = (SUITE_DIR / "all_dimension_aug_wan2.1_seed42.txt").read_text().splitlines()
    assert texts[0] == ext[lines.index(names[0])] and texts[0] != names[0]


def test_generate_takes_the_suite():
    from forcelab.generate.prompts import read_prompts

    args = argparse.Namespace(prompt=[], prompts=None, extended_prompts=None, vbench_prompts="color,scene",
                              vbench_extended=False, vbench=False)
    names, texts = read_prompts(args)
    assert args.vbench and args.vbench_suite["dimensions"] == ["color", "scene"] and names == texts
    assert "a red bicycle" in names and len(names) == args.vbench_suite["prompts"]
    with pytest.raises(ForcelabError, match="replaces"):
        read_prompts(argparse.Namespace(prompt=["x"], prompts=None, extended_prompts=None, vbench_prompts="all",
                                        vbench_extended=False, vbench=False))
    with pytest.raises(ForcelabError, match="unknown VBench dimension"):
        read_prompts(argparse.Namespace(prompt=[], prompts=None, extended_prompts=None, vbench_prompts="colour",
                                        vbench_extended=False, vbench=False))


def test_long_clip_ranges_and_scene_cuts():
    assert vbench_long.clip_ranges(200, 16, 2) == [(k * 32, k * 32 + 32) for k in range(6)] + [(168, 200)]
    assert vbench_long.clip_ranges(64, 16.0, 2) == [(0, 32), (32, 64)]
    assert vbench_long.clip_ranges(20, 16, 2) == [(0, 20)]                  # shorter than a clip: whole
    assert vbench_long.clip_ranges(90, 24.5, 2) == [(0, 48), (42, 90)]      # int(fps), as VBench-Long
    assert vbench_long.clip_seconds("human_action") == 10 and vbench_long.clip_seconds("scene") == 2
    dark = np.zeros((20, 8, 8, 3), np.uint8)
    red = np.zeros((20, 8, 8, 3), np.uint8)
    red[..., 0] = 255
    video = np.concatenate([dark, red[:10], dark[:15], red[:15]])
    assert vbench_long.scene_cuts(video) == [20, 45]              # the change at 30 is < 15 frames after 20
    clips = vbench_long.split_frames(video, fps=8, seconds=2)
    assert [len(c) for c in clips] == [16, 16, 16, 16, 15]       # 20 -> 2 clips, 25 -> 2 clips, 15 -> whole
