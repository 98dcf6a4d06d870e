"""Background persistence (eval/persistence.py) on ground truth and known degradations."""

import math

import numpy as np
import pytest

from forcelab.data.toyworld import ToyWorld, ToyWorldConfig
from forcelab.errors import ForcelabError
from forcelab.eval import stats
from forcelab.eval.degradations import blur, ramp, shift_colour
from forcelab.eval.persistence import background_image, background_psnr, free_pixels
from forcelab.eval.toybench import PSNR_CAP

TEXTURE = 60.0       # amplitude of the textured world (pixel levels)
FRAMES, UNIT = 24, 4  # a clip cut into chunks of UNIT frames, as exposure scores them
SEEDS = (10 ** 6, 10 ** 6 + 1, 10 ** 6 + 2)


def _scene(world, seed):
    clip = world.clip(seed, FRAMES)
    c = world.config
    return (clip, clip.video.permute(0, 2, 3, 1).numpy(), background_image(world, clip.scene),
            free_pixels(clip.positions, clip.scene.radius, (c.height, c.width)))


def _per_chunk(frames, image, free):
    return np.array([background_psnr(frames[k:k + UNIT], image, free[k:k + UNIT]) for k in range(0, FRAMES, UNIT)])


@pytest.mark.parametrize("texture", [0.0, TEXTURE])
def test_ground_truth_scores_the_cap(texture):
    world = ToyWorld(ToyWorldConfig(background_texture=texture))
    for seed in SEEDS:
        _, frames, image, free = _scene(world, seed)
        assert free.mean() > 0.5
        assert (_per_chunk(frames, image, free) == PSNR_CAP).all()


def test_a_uniform_offset_gives_the_closed_form():
    """Every background pixel off by d levels in each channel: PSNR = 10 log10(255^2 / d^2)."""
    world = ToyWorld(ToyWorldConfig(background_texture=TEXTURE))
    offset = 5
    for seed in SEEDS:
        _, frames, image, free = _scene(world, seed)
        target = np.rint(image)
        # paint the background pixels exactly at target + offset (no clipping near 255 in this world)
        shifted = frames.copy()
        shifted[free] = (target + offset).astype(np.uint8)[np.nonzero(free)[1:]]
        assert background_psnr(shifted, image, free) == pytest.approx(10 * math.log10(255 ** 2 / offset ** 2), abs=1e-9)


def test_a_ball_elsewhere_is_not_a_background_error():
    """A video whose balls move elsewhere than the truth's keeps a perfect background."""
    world = ToyWorld(ToyWorldConfig(background_texture=TEXTURE))
    for seed in SEEDS:
        clip, _, image, free = _scene(world, seed)
        moved = world.render(clip.scene, clip.positions[::-1].copy()).permute(0, 2, 3, 1).numpy()
        assert background_psnr(moved, image, free) == PSNR_CAP


@pytest.mark.parametrize("texture", [0.0, TEXTURE])
def test_growing_degradations_lower_it_with_a_negative_slope(texture):
    world = ToyWorld(ToyWorldConfig(background_texture=texture))
    for seed in SEEDS:
        _, frames, image, free = _scene(world, seed)
        for bad in (blur(frames, ramp(FRAMES, 1.5)), shift_colour(frames, ramp(FRAMES, 30.0))):
            scores = _per_chunk(bad, image, free)
            assert (np.diff(scores) <= 0).all() and scores[-1] < scores[0] - 10
            assert stats.slope(scores[1:]) < 0


def test_bad_shapes_are_refused():
    world = ToyWorld(ToyWorldConfig(background_texture=TEXTURE))
    _, frames, image, free = _scene(world, SEEDS[0])
    with pytest.raises(ForcelabError, match="background_psnr"):
        background_psnr(frames[:, :16], image, free)
