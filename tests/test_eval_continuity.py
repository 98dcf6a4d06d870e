"""The continuity metric (eval/continuity.py) against a degradation whose effect is known: a clip
whose clock jumps at every chunk start (eval/degradations.seams) scores worse by the stated
amount, ground truth and a uniform colour cast score seamless, and ToyBench reads the chunk starts
from a video's sidecar. Stated amounts are the measured ones (seeds 0, 1, 3; 32 frames) with a
margin, noted beside each bound."""

import math

import numpy as np
import pytest

from forcelab.data.toyworld import ToyWorld, make_caption
from forcelab.errors import ForcelabError
from forcelab.eval import degradations as D
from forcelab.eval.continuity import boundary_jump, chunk_starts, continuity, frame_steps
from forcelab.eval.toybench import score_video
from forcelab.eval.toybench_run import sidecar_chunk_starts

T, SEEDS, WORLD = 32, (0, 1, 3), ToyWorld()


def frames_of(video):
    return video.permute(0, 2, 3, 1).numpy()


def test_chunk_starts_follow_the_codecs_clock():
    assert chunk_starts(8, 2) == [2, 4, 6]
    assert chunk_starts(33, 2, temporal_stride=4) == [5, 13, 21, 29]   # latents 2, 4, 6, 8 of 9
    assert chunk_starts(8, 8) == [] and chunk_starts(8, 1) == list(range(1, 8))
    with pytest.raises(ForcelabError, match="chunk_latent"):
        chunk_starts(8, 0)


def test_boundary_jump_by_hand():
    f = np.zeros((5, 1, 1, 3), np.uint8)
    f[:, 0, 0, 0] = [0, 1, 2, 6, 7]            # steps 1, 1, 4, 1: a seam at frame 3
    assert frame_steps(f).tolist() == pytest.approx([1 / 3, 1 / 3, 4 / 3, 1 / 3])
    assert boundary_jump(f, [3]) == pytest.approx(4.0) and continuity(f, [3]) == pytest.approx(0.25)
    assert continuity(f, [2]) == 1.0                                 # a smaller step at the boundary
    assert math.isnan(continuity(f, [])) and math.isnan(continuity(f, [1, 2, 3, 4]))   # frame-wise: no inside
    still = np.zeros((4, 1, 1, 3), np.uint8)
    assert continuity(still, [2]) == 1.0
    with pytest.raises(ForcelabError, match="outside"):
        boundary_jump(f, [5])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("chunk", [2, 4])
def test_injected_seams_score_worse_and_ground_truth_seamless(seed, chunk):
    clip = WORLD.clip(seed, frames=T)
    starts = chunk_starts(T, chunk)
    gt = frames_of(clip.video)
    assert continuity(gt, starts) >= 0.98                                  # measured 0.99-1.0
    # a cast on every frame moves no step: still seamless
    assert continuity(D.shift_colour(gt, D.constant(T, 30.0)), starts) >= 0.98
    one, three = (continuity(D.seams(clip, starts, skip), starts) for skip in (1.0, 3.0))
    assert one <= 0.6                       # measured 0.50-0.54: the step into a chunk is about twice a step
    assert three <= 0.45 and three < one    # measured 0.26-0.40


def test_toybench_scores_continuity_from_the_chunk_starts():
    clip = WORLD.clip(0, frames=T)
    caption = make_caption(clip.scene.colors, clip.scene.speed)
    starts = chunk_starts(T, 2)
    plain = score_video(frames_of(clip.video), caption)
    assert "continuity" not in plain
    gt = score_video(frames_of(clip.video), caption, chunk_starts=starts)
    seamed = score_video(D.seams(clip, starts, 2.0), caption, chunk_starts=starts)
    assert gt["continuity"] >= 0.98 and seamed["continuity"] <= gt["continuity"] - 0.4   # measured 0.34


def test_the_sidecar_names_the_chunks():
    causal = {"plan": {"plan": "chunkwise", "chunk_frames": None}, "model_config": {"chunk_frames": 2},
              "frames": 8, "latent_frames": 8}
    assert sidecar_chunk_starts(causal, 8) == [2, 4, 6]
    framewise = dict(causal, plan={"plan": "chunkwise", "chunk_frames": 1})
    assert sidecar_chunk_starts(framewise, 8) == list(range(1, 8))
    blocks = dict(causal, plan={"plan": "step_matrix", "chunk_frames": None, "block_frames": 4})
    assert sidecar_chunk_starts(blocks, 8) == [4]
    assert sidecar_chunk_starts({"plan": {"plan": "teacher"}, "frames": 8, "latent_frames": 8}, 8) is None
