"""eval/exposure.py: teacher-forced vs self-conditioned rollouts of a causal student.

The teacher-forced cache is checked against a plain re-implementation (a fresh cache given the
ground truth chunk by chunk, nothing generated in between); the two modes against each other
where the ground truth IS the student's own rollout (then they must agree bit for bit)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from forcelab.errors import ForcelabError
from forcelab.eval import stats
from forcelab.data.toyworld import ToyWorld, ToyWorldConfig
from forcelab.eval.degradations import blur, ramp
from forcelab.eval.exposure import (METRICS, Student, check_student, measure_exposure, psnr, run_world, score_chunks,
                                    self_conditioned, summarize, teacher_forced, true_backgrounds)
from forcelab.eval.toybench import PSNR_CAP
from forcelab.models import CausalDiT, DiTConfig
from forcelab.models.autoencoder import ToyCodec, load_autoencoder
from forcelab.models.kv_cache import EMPTY
from forcelab.models.plans import Chunkwise, Rolling
from forcelab.models.rollout import CONTEXT, Noise, commit_frames
from forcelab.models.schedule import add_noise, timestep_to_sigma
from forcelab.models.text_encoder import load_text_encoder

WINDOW, SINK, CHUNKS = 4, 2, 5      # a ring of 2 frames: it wraps within 5 chunks of 2 frames
H = W = 8                           # latent size of the toy codec's 32x32 frames


@pytest.fixture(scope="module")
def student():
    """A random two-layer toy DiT: the second layer's keys depend on what the first attended to,
    so a cache that lost a context frame holds different keys (one layer's would not)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CausalDiT(DiTConfig.preset("toy", num_layers=2)).eval()
    return Student(model, Chunkwise(window_frames=WINDOW, sink_frames=SINK), load_autoencoder("toy"),
                   load_text_encoder("toy"))


def _inputs(student, batch=2, seed=3):
    context = student.text_encoder.encode(["a red ball", "a blue ball and a green ball"][:batch])[0]
    frames = CHUNKS * student.unit
    truth = torch.randn(batch, student.model.config.in_channels, frames, H, W,
                        generator=torch.Generator().manual_seed(seed))
    return context, Noise(list(range(batch)), truth.shape[1], H, W), truth


def _plain_truth_cache(student, context, truth, context_noise=0.0, noise=None):
    """The reference: a fresh cache committed the ground truth chunk by chunk, nothing else."""
    model, unit = student.model, student.unit
    cache = model.new_cache(truth.shape[0], H, W, chunk_frames=unit, window_frames=WINDOW, sink_frames=SINK)
    model.set_prompt(cache, context)
    for f0 in range(0, truth.shape[2], unit):
        x = truth[:, :, f0:f0 + unit]
        if context_noise:
            x = add_noise(x, noise(f0, unit, CONTEXT), timestep_to_sigma(context_noise))
        commit_frames(model, cache, x, context_noise, f0)
    return cache


def _assert_same_store(a, b):
    assert a.slot_frame == b.slot_frame and a.end_frame == b.end_frame
    S = a.tokens_per_frame
    for layer in range(len(a.k)):
        for s, frame in enumerate(a.slot_frame):
            if frame != EMPTY:
                assert torch.equal(a.k[layer][:, s * S:(s + 1) * S], b.k[layer][:, s * S:(s + 1) * S]), (layer, s)
                assert torch.equal(a.v[layer][:, s * S:(s + 1) * S], b.v[layer][:, s * S:(s + 1) * S]), (layer, s)


def test_teacher_forced_cache_holds_exactly_the_committed_ground_truth(student):
    context, noise, truth = _inputs(student)
    _, cache = teacher_forced(student, context, noise, truth)
    assert cache.slot_frame != [EMPTY] * cache.num_slots and cache.end_frame == truth.shape[2]
    _assert_same_store(cache, _plain_truth_cache(student, context, truth))
    # the recompute reference keeps latents: they are the ground truth itself
    _, frame_cache = teacher_forced(student, context, noise, truth, recompute=True)
    assert torch.equal(frame_cache.x, truth) and torch.equal(frame_cache.t, torch.zeros(2, truth.shape[2]))


def test_teacher_forced_commits_with_the_plans_context_noise(student):
    noisy = Student(student.model, Chunkwise(window_frames=WINDOW, sink_frames=SINK, context_noise=100.0),
                    student.codec, student.text_encoder)
    context, noise, truth = _inputs(noisy)
    _, cache = teacher_forced(noisy, context, noise, truth)
    _assert_same_store(cache, _plain_truth_cache(noisy, context, truth, 100.0, noise))


def test_both_modes_agree_when_the_ground_truth_is_the_students_own_rollout(student):
    context, noise, truth = _inputs(student)
    own = self_conditioned(student, context, noise, truth.shape[2])
    forced, _ = teacher_forced(student, context, noise, own)
    assert torch.equal(forced, own)
    # another ground truth: chunk 1 (no context) is the same, later chunks see it and differ
    other, _ = teacher_forced(student, context, noise, truth)
    unit = student.unit
    assert torch.equal(other[:, :, :unit], own[:, :, :unit])
    assert not torch.allclose(other[:, :, unit:2 * unit], own[:, :, unit:2 * unit])


def test_measure_exposure_reports_a_zero_gap_at_the_first_chunk(student):
    result = measure_exposure(student, scenes=2, chunks=3, batch=2)
    assert result["scenes"] == 2 and result["chunks"] == 3 and result["unit"] == student.unit
    for m in ("psnr", "adherence", "identity", "background"):
        g = result["gap"][m]
        assert g["per_chunk"][0] == 0.0 and len(g["per_chunk"]) == 3 and len(g["ci95"]) == 3
        lo, hi = g["slope_ci95"]
        assert lo <= g["slope"] <= hi
        sc, tf = result["per_scene"]["self_conditioned"][m], result["per_scene"]["teacher_forced"][m]
        want = np.mean(np.array(sc) - np.array(tf), 0)
        np.testing.assert_allclose(g["per_chunk"], want, atol=1e-12)


def test_gap_level_and_slope_count_the_chunks_with_context_only():
    K, N = 6, 4
    k = np.arange(1, K + 1, dtype=float)
    forced = np.random.default_rng(1).uniform(size=(N, K))
    header = {"model": "m", "plan": {}, "unit": 2, "chunks": K, "first_scene": 0}

    def result(gap):                       # the same gap in every scene
        per_scene = {"teacher_forced": {m: forced.tolist() for m in METRICS},
                     "self_conditioned": {m: (forced + gap).tolist() for m in METRICS}}
        return summarize(per_scene, header)["gap"]["psnr"]

    step = result(np.where(k > 1, -1.0, 0.0))          # a constant gap once there is context
    assert step["mean"] == pytest.approx(-1.0) and step["slope"] == pytest.approx(0.0, abs=1e-12)
    assert step["slope_ci95"] == pytest.approx([0.0, 0.0], abs=1e-12)
    growing = result(-0.1 * (k - 1))                   # a gap compounding by 0.1 per chunk
    assert growing["slope"] == pytest.approx(-0.1) and growing["mean"] == pytest.approx(-0.1 * np.mean(k[1:] - 1))
    np.testing.assert_allclose(growing["per_chunk"], -0.1 * (k - 1), atol=1e-12)


def test_psnr_closed_form():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 16                               # mse = 256 / 96
    assert psnr(b, a) == pytest.approx(10 * math.log10(255 ** 2 * 96 / 256))
    assert psnr(a, a) == 60.0


def test_bootstrap_interval_of_a_mean_matches_the_normal_interval():
    x = np.random.default_rng(0).standard_normal(400)
    lo, hi = stats.bootstrap_ci(x)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert lo < x.mean() < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert stats.bootstrap_ci(np.full(5, 2.5)) == (2.5, 2.5)
    assert all(math.isnan(v) for v in stats.bootstrap_ci([]))


def test_bad_inputs_say_what_to_fix(student, toy_dit, tmp_path):
    with pytest.raises(ForcelabError, match="chunks must be an integer >= 2"):
        check_student(student, 1, 4)
    with pytest.raises(ForcelabError, match="scenes must be"):
        check_student(student, 4, 0)
    rolling = Student(student.model, Rolling(), student.codec, student.text_encoder)
    with pytest.raises(ForcelabError, match="chunkwise plan"):
        check_student(rolling, 4, 4)
    strided = Student(student.model, student.plan, ToyCodec(temporal_stride=2), student.text_encoder)
    with pytest.raises(ForcelabError, match="compresses time"):
        check_student(strided, 4, 4)
    from forcelab.eval.exposure import load_student

    with pytest.raises(ForcelabError, match="not found"):
        load_student(tmp_path / "missing")
    with pytest.raises(ForcelabError, match="an attention sink needs a window"):
        check_student(load_student(toy_dit, window_frames=0, sink_frames=2), 4, 4)


def test_cli_runs_and_rejects_a_bad_flag(toy_dit, tmp_path, capsys):
    import json

    from forcelab.cli import main

    out = tmp_path / "exposure"
    assert main(["eval", "exposure", str(toy_dit), "--out", str(out), "--scenes", "1", "--chunks", "2",
                 "--window", "4", "--sink", "2", "--cache-policy", "temporal_merge"]) == 0
    result = json.loads((out / "exposure.json").read_text())
    assert result["kind"] == "exposure" and result["plan"]["window_frames"] == 4
    assert result["plan"]["cache_policy"] == "temporal_merge"
    assert (out / "exposure.md").read_text().startswith(str(toy_dit))
    capsys.readouterr()
    assert main(["eval", "exposure", str(toy_dit), "--out", str(out), "--chunks", "0"]) != 0
    assert "--chunks" in capsys.readouterr().err
    assert main(["eval", "exposure", str(toy_dit), "--out", str(out), "--chunks", "1"]) != 0
    assert "chunks must be an integer >= 2" in capsys.readouterr().err
    assert main(["eval", "exposure", str(toy_dit), "--out", str(out), "--cache-policy", "lru"]) == 2
    assert "--cache-policy 'lru': unknown policy" in capsys.readouterr().err


def test_background_persistence_per_chunk_on_the_textured_world():
    """Ground truth keeps its background in every chunk (the cap); a blur growing over the
    clip loses it more chunk after chunk (a negative slope)."""
    world = ToyWorld(ToyWorldConfig(background_texture=60.0))
    chunks, unit, seed = 6, 2, 10 ** 6
    clip = world.clip(seed, chunks * unit)
    truth = clip.video.permute(0, 2, 3, 1).numpy()
    background = true_backgrounds(world, [seed], chunks * unit)[0]
    ideal = score_chunks(truth, truth, truth, clip.scene.caption, unit, world.config, background)["background"]
    assert (ideal == PSNR_CAP).all()
    bad = blur(truth, ramp(len(truth), 1.5))
    worse = score_chunks(bad, bad, truth, clip.scene.caption, unit, world.config, background)["background"]
    assert worse[-1] < worse[2] < PSNR_CAP and stats.slope(worse[1:]) < 0


def test_the_world_follows_the_run_config(tmp_path):
    run, dit = tmp_path / "runs" / "df", tmp_path / "dit" / "model"
    run.mkdir(parents=True)
    dit.mkdir(parents=True)
    (run / "config.yaml").write_text("recipe: diffusion_forcing\ndata:\n  background_texture: 25.0\n")
    assert run_world(run).config.background_texture == 25.0
    assert run_world(run / "checkpoint-000600").config.background_texture == 25.0   # a checkpoint folder: its run's
    assert run_world(run, 0.0).config.background_texture == 0.0
    assert run_world(dit).config.background_texture == 0.0                           # no config: the plain world


def test_a_ground_truth_prefix_then_the_students_own_chunks(student):
    """forced_frames: the truth replaces the chunks before it, the student's own the rest. No
    prefix is the ordinary rollout; a prefix matches the teacher-forced chunks up to its end and
    then continues as the ordinary rollout of a video that began with the truth (checked against
    teacher_forced given exactly that video as its ground truth)."""
    context, noise, truth = _inputs(student)
    unit, frames = student.unit, truth.shape[2]
    own = self_conditioned(student, context, noise, frames)
    assert torch.equal(teacher_forced(student, context, noise, truth, forced_frames=0)[0], own)
    forced, _ = teacher_forced(student, context, noise, truth)
    assert torch.equal(teacher_forced(student, context, noise, truth, forced_frames=frames)[0], forced)
    prefix = 2 * unit
    cont, _ = teacher_forced(student, context, noise, truth, forced_frames=prefix)
    assert torch.equal(cont[:, :, :prefix + unit], forced[:, :, :prefix + unit])   # chunk P + 1 saw only the truth
    video = torch.cat([truth[:, :, :prefix], cont[:, :, prefix:]], dim=2)          # what that rollout's context held
    assert torch.equal(teacher_forced(student, context, noise, video)[0], cont)
    assert not torch.allclose(cont[:, :, prefix + unit:], forced[:, :, prefix + unit:])


def test_the_gap_after_a_prefix_counts_only_the_chunks_after_it():
    K, N, P = 7, 3, 2
    k = np.arange(1, K + 1, dtype=float)
    forced = np.random.default_rng(2).uniform(size=(N, K))
    gap = np.where(k > P, -0.2 * (k - P), 0.0)            # compounding once the prefix ends
    per_scene = {"teacher_forced": {m: forced.tolist() for m in METRICS},
                 "self_conditioned": {m: (forced + gap).tolist() for m in METRICS}}
    header = {"model": "m", "plan": {}, "unit": 2, "chunks": K, "first_scene": 0, "prefix": P}
    g = summarize(per_scene, header)["gap"]["background"]
    assert g["slope"] == pytest.approx(-0.2) and g["mean"] == pytest.approx(-0.2 * np.mean(k[P:] - P))


def test_a_prefix_must_leave_two_chunks(student):
    with pytest.raises(ForcelabError, match="prefix"):
        measure_exposure(student, scenes=1, chunks=3, prefix=2)
