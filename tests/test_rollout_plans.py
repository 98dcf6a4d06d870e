"""Plan math: the AD step matrix, the pyramid, the rolling window, segments (no DiT)."""

import pytest
import torch

from forcelab.errors import ForcelabError
from forcelab.models.plans import (
    Chunkwise, Rolling, StepMatrix, Teacher, ad_iterations, ad_step_matrix, default_timesteps,
    iterate_levels, levels_matrix, pyramid_step_matrix)


def test_ad_matrix_by_hand():
    # 3 frames, 2 steps, ar_step 1: frame i sits one step behind frame i - 1
    assert ad_step_matrix(3, 2, 1).tolist() == [[1, 0, 0], [2, 1, 0], [2, 2, 1], [2, 2, 2]]
    # fully autoregressive: one frame at a time
    assert ad_step_matrix(2, 2, 2).tolist() == [[1, 0], [2, 0], [2, 1], [2, 2]]


@pytest.mark.parametrize("frames,steps,ar_step", [(1, 4, 0), (5, 4, 0), (5, 4, 1), (6, 4, 2),
                                                  (4, 3, 3), (7, 5, 4), (3, 1, 1)])
def test_ad_matrix_properties(frames, steps, ar_step):
    m = ad_step_matrix(frames, steps, ar_step)
    assert m.shape == (steps + (frames - 1) * ar_step, frames) == (ad_iterations(frames, steps, ar_step), frames)
    full = torch.cat([torch.zeros(1, frames, dtype=m.dtype), m])   # the state before iteration 0
    assert (full[0] == 0).all() and (m[-1] == steps).all()          # starts all noise, ends all clean
    assert ((full[1:] - full[:-1]) >= 0).all() and ((full[1:] - full[:-1]) <= 1).all()
    # earlier frames are never noisier: completed steps do not increase along frames,
    # i.e. the noise level (timestep) is non-decreasing across frames
    assert (m[:, 1:] <= m[:, :-1]).all()
    assert ((full[1:] - full[:-1]).sum(0) == steps).all()          # every frame takes every step


def test_ar_step_zero_is_the_synchronous_teacher_schedule():
    m = ad_step_matrix(5, 4, 0)
    assert m.tolist() == [[k] * 5 for k in range(1, 5)]
    teacher_rows = [(first, levels) for first, levels in Teacher(steps=4).iterations()]
    assert teacher_rows == [(0, [k]) for k in range(4)]              # one unit, the same levels
    assert torch.equal(levels_matrix(5, 4, 0), m)


@pytest.mark.parametrize("units,steps,ar_step,segment", [(6, 4, 1, None), (6, 4, 4, None), (6, 3, 0, None),
                                                         (7, 3, 2, None), (7, 3, 1, 3), (8, 4, 0, 4)])
def test_lazy_iterations_match_the_matrix(units, steps, ar_step, segment):
    rows = list(iterate_levels(units, steps, ar_step, segment))
    for first, levels in rows:
        assert all(0 <= lv < steps for lv in levels)
        assert levels == sorted(levels, reverse=True)               # contiguous, earlier = cleaner
    if segment is None:
        assert torch.equal(levels_matrix(units, steps, ar_step), ad_step_matrix(units, steps, ar_step))
    else:   # segments run one after another, each its own AD schedule
        m = levels_matrix(units, steps, ar_step, segment)
        n_seg = ad_iterations(segment, steps, ar_step)
        assert torch.equal(m[:n_seg, :segment], ad_step_matrix(segment, steps, ar_step))
        assert (m[:n_seg, segment:] == 0).all() and (m[n_seg - 1:, :segment] == steps).all()


def test_rolling_every_frame_passes_every_level_once():
    chunks, steps = 6, 4
    plan = Rolling(timesteps=default_timesteps(steps, 5.0))
    seen = {u: [] for u in range(chunks)}
    widths = []
    for i, (first, levels) in enumerate(plan.iterations(chunks, 2)):
        widths.append(len(levels))
        for k, lv in enumerate(levels):
            seen[first + k].append((i, lv))
    for u, visits in seen.items():
        assert [lv for _, lv in visits] == list(range(steps))            # each level exactly once, in order
        assert [i for i, _ in visits] == list(range(u, u + steps))       # on consecutive iterations
    # windows of `steps` chunks, partial at the start and the end
    assert widths == [1, 2, 3, 4, 4, 4, 3, 2, 1]


def test_chunkwise_is_one_chunk_at_a_time():
    plan = Chunkwise()
    rows = list(plan.iterations(3, 2))
    assert rows == [(u, [lv]) for u in range(3) for lv in range(4)]


def test_pyramid_repeats_blocks():
    m = pyramid_step_matrix(6, 3, 1, block_frames=2)
    assert torch.equal(m[:, ::2], ad_step_matrix(3, 3, 1)) and torch.equal(m[:, 1::2], m[:, ::2])
    with pytest.raises(ForcelabError, match="multiple of block_frames"):
        pyramid_step_matrix(5, 3, 1, block_frames=2)


def test_default_timesteps_warp():
    assert default_timesteps(4, 5.0) == pytest.approx([1000.0, 937.5, 2500 / 3, 625.0])
    assert Teacher(steps=3, shift=1.0).timesteps == pytest.approx([999.0, 666.0, 333.0])


def test_bad_plans_are_clear_errors():
    with pytest.raises(ForcelabError, match="ar_step"):
        ad_step_matrix(4, 3, 4)
    with pytest.raises(ForcelabError, match="ar_step"):
        StepMatrix(ar_step=-1)
    with pytest.raises(ForcelabError, match="strictly decreasing"):
        Chunkwise(timesteps=[500, 750])
    with pytest.raises(ForcelabError, match="strictly decreasing"):
        Chunkwise(timesteps=[1000, 0])
    with pytest.raises(ForcelabError, match="update"):
        Rolling(update="ddim")
    with pytest.raises(ForcelabError, match="solver"):
        Teacher(solver="dpm")
    with pytest.raises(ForcelabError, match="multiple of the model's chunk_frames"):
        StepMatrix(block_frames=3).unit_frames(2)
    with pytest.raises(ForcelabError, match="segment_frames"):
        StepMatrix(segment_frames=3).segment_units(2)
