"""ToyBench against degradations whose effect is known (eval/degradations.py): each moves the
metric it concerns by a stated amount, a growing one makes that metric's drift slope clearly
negative while a constant one lowers its level at a slope near 0, the others stay where they
were, and ground truth scores at its best. The stated amounts are the measured ones (seeds 0,
1, 3; 32 frames in buckets of 8) with a margin, noted beside each bound."""

import numpy as np
import pytest

from forcelab.data.toyworld import Scene, ToyClip, ToyWorld, make_caption
from forcelab.errors import ForcelabError
from forcelab.eval import degradations as D
from forcelab.data.toyworld import parse_caption
from forcelab.eval.toybench import frame_metrics, score_video

T = 32
BUCKET = 8                 # 4 buckets, so a slope has something to fit
SEEDS = (0, 1, 3)          # 3, 2 and 2 balls; slow and fast
WORLD = ToyWorld()
MOTION = ("adherence", "identity", "physics", "dynamics")   # what pixel corruptions should leave alone
GHOST_FRAMES = range(8, 16)          # bucket 1
GHOST_OPACITY = 0.8                  # a faint ghost: found as a ball, but not the renderer's ball
CLEAN_LEVEL = {"adherence": 1.0, "identity": 1.0, "physics": 1.0, "dynamics": 1.0}


def frames_of(video):
    return video.permute(0, 2, 3, 1).numpy()


def corruptions(clip):
    f = frames_of(clip.video)
    return {
        "shift": D.shift_colour(f, D.ramp(T, 60.0)),           # a colour cast growing to 60 levels
        "shift_constant": D.shift_colour(f, D.constant(T, 30.0)),
        "shift_strong": D.shift_colour(f, D.ramp(T, 300.0)),   # the balls' colours are lost on the way
        "blur": D.blur(f, D.ramp(T, 1.5)),                     # sigma 0 -> 1.5 px
        "blur_constant": D.blur(f, D.constant(T, 0.75)),
        "saturate": D.saturate(f, D.ramp(T, 1.0)),             # up to twice as saturated
        "slow": D.slow_down(clip, final_speed=0.25),
        "swap": D.swap_identities(clip, frame=T // 2),
        "ghost": D.ghost_ball(clip, GHOST_FRAMES, opacity=GHOST_OPACITY),
    }


@pytest.fixture(scope="module")
def scores():
    """{seed: {"gt" | corruption: score_video dict}}, captions naming the true speed."""
    out = {}
    for seed in SEEDS:
        clip = WORLD.clip(seed, frames=T)
        caption = make_caption(clip.scene.colors, clip.scene.speed)
        out[seed] = {"gt": score_video(frames_of(clip.video), caption, bucket_frames=BUCKET)}
        out[seed].update({k: score_video(v, caption, bucket_frames=BUCKET) for k, v in corruptions(clip).items()})
    return out


def test_ground_truth_scores_ideal(scores):
    for seed in SEEDS:
        gt = scores[seed]["gt"]
        for m, best in CLEAN_LEVEL.items():
            assert gt[m] == best and gt[f"{m}_drift"] == 0.0, (seed, m)
        assert gt["clean_pixels"] == 1.0 and gt["fidelity_psnr"] >= 50.0      # measured 55.5-58.3 dB
        assert gt["fidelity_adherent"] == gt["fidelity_psnr"]                # every frame adherent


@pytest.mark.parametrize("seed", SEEDS)
def test_growing_colour_shift_lowers_fidelity_over_time_and_nothing_else(scores, seed):
    gt, s = scores[seed]["gt"], scores[seed]["shift"]
    assert s["fidelity_psnr"] <= gt["fidelity_psnr"] - 20.0        # measured 29.8-32.0 dB lower
    assert s["fidelity_psnr_drift"] <= -3.0                        # measured -5.7 to -6.7 dB per bucket
    # pixels go stray (> STRAY_LEVEL 32 in a channel) in the last quarter, where the cast passes
    # 32 * sqrt(2) levels along (1, 0, -1) / sqrt(2)
    assert s["clean_pixels"] <= 0.85 and s["clean_pixels_drift"] <= -0.2    # measured 0.75, -0.30
    for m in MOTION:                 # 60 levels leave every ball nearest its own palette colour
        assert s[m] == gt[m] and s[f"{m}_drift"] == 0.0, m


@pytest.mark.parametrize("seed", SEEDS)
def test_a_constant_corruption_lowers_the_level_not_the_slope(scores, seed):
    gt, s = scores[seed]["gt"], scores[seed]
    for kind, drop in (("shift_constant", 20.0), ("blur_constant", 15.0)):     # measured >= 34.1 and >= 25.8 dB
        assert s[kind]["fidelity_psnr"] <= gt["fidelity_psnr"] - drop, kind
        assert s[kind]["fidelity_psnr_drift"] >= -0.5, kind                    # measured >= -0.1 dB per bucket
        for m in MOTION:
            assert s[kind][m] == gt[m], (kind, m)
    # 30 levels along (1, 0, -1) / sqrt(2) are 21 per channel: under STRAY_LEVEL, so no stray pixel
    assert s["shift_constant"]["clean_pixels"] >= 0.99


@pytest.mark.parametrize("seed", SEEDS)
def test_growing_blur_and_saturation_lower_fidelity_over_time_but_keep_the_balls(scores, seed):
    gt, s = scores[seed]["gt"], scores[seed]
    for kind, drop, slope in (("blur", 15.0, -5.0),                # measured 17.6-21.5 dB lower, -8.4 to -10.0
                              ("saturate", 15.0, -2.5)):           # measured 24.8-25.6 dB lower, -3.9 to -5.2
        assert s[kind]["fidelity_psnr"] <= gt["fidelity_psnr"] - drop, kind
        assert s[kind]["fidelity_psnr_drift"] <= slope, kind
        assert s[kind]["clean_pixels_drift"] < 0, kind             # measured -0.02 to -0.04 per bucket
        # the balls stay where they are, their colours nearest their own: detection and motion unharmed
        for m in MOTION:
            assert s[kind][m] == gt[m], (kind, m)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_ghost_ball_costs_fidelity_but_not_fidelity_on_adherent_frames(scores, seed):
    """A faint uncaptioned ball in free space in frames 8..15 is found (those frames lose
    adherence) but drawn off the renderer's colours, so fidelity_psnr falls; fidelity_adherent
    leaves those frames out and is exactly ground truth's fidelity over the other frames (the
    same frames, the same detections). That differs from ground truth's over all frames by which
    frames are averaged, not by the ghost."""
    gt, s = scores[seed]["gt"], scores[seed]["ghost"]
    assert s["fidelity_psnr"] <= gt["fidelity_psnr"] - 4.0               # measured 6.1-6.4 dB lower
    assert s["adherence@1"] < 1.0 and s["adherence"] < gt["adherence"]  # measured 0.67-0.75 in bucket 1
    assert np.isnan(s["fidelity_adherent@1"])                          # no adherent frame in bucket 1
    clip = WORLD.clip(seed, frames=T)
    colors, speed = parse_caption(make_caption(clip.scene.colors, clip.scene.speed))
    per_frame = frame_metrics(frames_of(clip.video), colors, speed, WORLD.config)["fidelity_psnr"]
    others = [t for t in range(T) if t not in GHOST_FRAMES]
    assert s["fidelity_adherent"] == pytest.approx(per_frame[others].mean(), rel=1e-12)
    assert abs(s["fidelity_adherent"] - gt["fidelity_adherent"]) <= 1.0  # measured 0.06-0.47 dB


@pytest.mark.parametrize("seed", SEEDS)
def test_blur_lowers_fidelity_on_adherent_frames_too(scores, seed):
    gt, s = scores[seed]["gt"], scores[seed]
    for kind in ("blur", "blur_constant"):          # the balls are still found: every frame adherent
        assert s[kind]["fidelity_adherent"] == s[kind]["fidelity_psnr"], kind
        assert s[kind]["fidelity_adherent"] <= gt["fidelity_adherent"] - 15.0, kind   # measured >= 17.6 dB


@pytest.mark.parametrize("seed", SEEDS)
def test_slowing_lowers_dynamics_over_time_but_not_physics(scores, seed):
    gt, s = scores[seed]["gt"], scores[seed]["slow"]
    assert s["dynamics"] <= gt["dynamics"] - 0.2                   # measured 0.27-0.67 lower
    assert s["dynamics_drift"] <= -0.2                             # measured -0.31 to -0.35 per bucket
    # the deceleration, 0.75 |v| / 31 <= 0.06 px/frame^2, is far under PHYSICS_TOL: a steady
    # slow-down is lawful motion frame by frame, and only the speed against the caption sees it
    for m in ("adherence", "identity", "physics"):
        assert s[m] == gt[m], m
    assert s["fidelity_psnr"] >= 50.0 and s["clean_pixels"] == 1.0


@pytest.mark.parametrize("seed", SEEDS)
def test_an_identity_swap_breaks_the_paths_not_the_colour_counts(scores, seed):
    gt, s = scores[seed]["gt"], scores[seed]["swap"]
    # adherence and identity count colours per frame, which an exchange keeps: they cannot see it
    assert s["adherence"] == gt["adherence"] and s["identity"] == gt["identity"]
    # each colour's path jumps from one ball's to the other's at the swap (frame 16): physics
    # fails in the swap's buckets (and at some bounces elsewhere: a colour's walls sit at its
    # median radius, now between the two balls' radii)
    assert s["physics"] <= gt["physics"] - 0.04                    # measured 0.07-0.26 lower
    assert min(s["physics@1"], s["physics@2"]) <= 0.9              # measured 0.0-0.83
    assert s["dynamics"] >= gt["dynamics"] - 0.05


@pytest.mark.parametrize("seed", SEEDS)
def test_identity_drift_sees_colours_lost_for_most_of_the_clip(scores, seed):
    """A strong growing cast turns the balls into other palette colours from the second bucket on:
    identity refers to the set the clip starts with, so its per-bucket values fall (measured
    1.0, 0.12, 0, 0) and its drift is negative; against the clip's most common set they rose."""
    s = scores[seed]["shift_strong"]
    assert s["identity@0"] == 1.0 and s["identity"] <= 0.5                # measured 0.28
    assert s["identity_drift"] <= -0.2                                    # measured -0.31 per bucket
    assert s["adherence_drift"] <= -0.1 and s["fidelity_psnr_drift"] < 0  # measured -0.23 to -0.27


def centred_clip(speed: float, angle: float, at: float, frames: int) -> ToyClip:
    """One red ball of `speed` px/frame at the frame's centre at time `at`, far from every wall."""
    c = WORLD.config
    v = speed * np.array([np.cos(angle), np.sin(angle)])
    centre = np.array([c.width, c.height]) / 2.0
    scene = Scene(["red"], np.array([3.0]), centre[None] - v[None] * at, v[None], "slowly", "a red ball")
    positions, velocities, bounced = WORLD.trajectory(scene, frames)
    return ToyClip(WORLD.render(scene, positions), positions, velocities, bounced, scene)


REVERSAL_FRAMES = 16
SPEEDS = (WORLD.config.slow_speed[0], WORLD.config.slow_speed[1], WORLD.config.fast_speed[0], WORLD.config.fast_speed[1])


@pytest.mark.parametrize("speed", SPEEDS)
@pytest.mark.parametrize("fraction", (0.0, 0.25, 0.5, 0.75))
def test_physics_catches_a_reversal_away_from_the_walls_at_every_speed(speed, fraction):
    """A ball turning back at time 7 + fraction, at the centre: the frame where it turns fails
    physics, at the slowest speed too (turning mid-step at 0.4 px/frame the accelerations are
    0.4 each, under PHYSICS_TOL, and only the change of step, 0.8, shows it); the frames two
    away from the turn, and the same ball not turning, are lawful."""
    at = 7.0 + fraction
    clip = centred_clip(speed, angle=0.3, at=at, frames=REVERSAL_FRAMES)
    gt = score_video(frames_of(clip.video), "a red ball", bucket_frames=1)      # per frame: physics@t
    bad = score_video(D.reverse(clip, at), "a red ball", bucket_frames=1)
    frames = range(1, REVERSAL_FRAMES - 1)
    assert all(gt[f"physics@{t}"] == 1.0 for t in frames)
    failing = [t for t in frames if bad[f"physics@{t}"] == 0.0]
    assert failing and all(at - 2 <= t <= at + 1 for t in failing), failing   # windows t-1 .. t+2 holding the turn
    assert all(bad[f"physics@{t}"] == 1.0 for t in frames if t < at - 2 or t > at + 1)


def test_wall_bounces_are_lawful_on_ground_truth():
    bounces = 0
    for seed in range(12):
        clip = WORLD.clip(seed, frames=48)
        bounces += int(clip.bounced.sum())
        s = score_video(frames_of(clip.video), clip.scene.caption)
        assert s["physics"] == 1.0, seed
    assert bounces >= 20                                           # fast and slow balls, corners among them


def test_degradations_are_exact_at_zero_strength_and_pure():
    clip = WORLD.clip(1, frames=12)
    f = frames_of(clip.video)
    zero = D.constant(12, 0.0)
    for out in (D.shift_colour(f, zero), D.blur(f, zero), D.saturate(f, zero), D.slow_down(clip, 1.0),
                D.retime(clip, np.arange(12.0)), D.reverse(clip, at=11.0)):
        assert np.array_equal(out, f)
    np.testing.assert_array_equal(D.blur(f, D.ramp(12, 2.0)), D.blur(f, D.ramp(12, 2.0)))
    swapped = D.swap_identities(clip, frame=6)
    assert np.array_equal(swapped[:6], f[:6]) and not np.array_equal(swapped[6:], f[6:])
    assert D.ramp(5, 2.0).tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
    ghost = D.ghost_ball(clip, [3, 4])
    changed = (ghost != f).any((1, 2, 3))
    assert changed.tolist() == [t in (3, 4) for t in range(12)]


def test_blur_is_a_gaussian_of_the_given_sigma():
    """The response to a bright point has unit mass and variance sigma^2 per axis (rounding to
    uint8 and the 3-sigma truncation cost a few per cent)."""
    sigma = 1.5
    frame = np.zeros((1, 33, 33, 3), np.uint8)
    frame[0, 16, 16] = 255
    out = D.blur(frame, [sigma])[0, :, :, 0].astype(np.float64)
    ys, xs = np.mgrid[0:33, 0:33] - 16
    mass = out.sum()
    assert mass == pytest.approx(255, rel=0.05)
    assert (out * xs ** 2).sum() / mass == pytest.approx(sigma ** 2, rel=0.1)
    assert (out * ys ** 2).sum() / mass == pytest.approx(sigma ** 2, rel=0.1)
    assert np.array_equal(out, out.T)


def test_saturate_leaves_greys_and_moves_colours_out():
    frame = np.array([[[[100, 100, 100], [200, 100, 60]]]], np.uint8)       # [1, 1, 2, 3]
    out = D.saturate(frame, [1.0])[0, 0]
    assert out[0].tolist() == [100, 100, 100]
    assert out[1].tolist() == [255, 80, 0]          # grey 120: 120 + 2 * (80, -20, -60), clipped


@pytest.mark.parametrize("call, match", [
    (lambda f, c: D.blur(f, D.constant(3, 1.0)), "one finite value per frame"),
    (lambda f, c: D.blur(f, D.constant(len(f), -1.0)), "sigma must be >= 0"),
    (lambda f, c: D.shift_colour(f, D.constant(len(f), 1.0), direction=(0, 0, 0)), "direction must be 3 numbers"),
    (lambda f, c: D.blur(f.astype(np.float32), D.constant(len(f), 1.0)), r"uint8 \[T, H, W, 3\]"),
    (lambda f, c: D.swap_identities(c, 2, balls=(0, 0)), "two different indices"),
    (lambda f, c: D.slow_down(c, 2.0), "final_speed"),
    (lambda f, c: D.retime(c, np.zeros(3)), "times must be"),
    (lambda f, c: D.ghost_ball(c, [6]), r"frames must be indices in 0\.\.5"),
    (lambda f, c: D.ghost_ball(c, [0], opacity=0.0), "opacity"),
    (lambda f, c: D.ghost_ball(c, [0], color=c.scene.colors[0]), "a colour the scene lacks"),
])
def test_bad_arguments_are_one_clear_error(call, match):
    clip = WORLD.clip(1, frames=6)
    with pytest.raises(ForcelabError, match=match):
        call(frames_of(clip.video), clip)

