"""The toy world (data/toyworld.py): determinism, physics, captions, schema."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from forcelab.data.schema import collate
from forcelab.data.toyworld import PALETTE, SPEED_WORDS, ToyWorld, ToyWorldConfig, ToyWorldDataset, make_caption, \
    measure_codec_statistics, parse_caption
from forcelab.errors import ConfigError, ForcelabError
from forcelab.models.autoencoder import load_autoencoder, toy_latent_stats
from forcelab.models.config import DiTConfig
from forcelab.models.text_encoder import TOY_VOCAB, toy_words

SEEDS = range(40)


@pytest.fixture(scope="module")
def world():
    return ToyWorld()


def test_same_seed_same_video(world):
    a, b = world.clip(5, frames=24), ToyWorld().clip(5, frames=24)
    assert torch.equal(a.video, b.video) and np.array_equal(a.positions, b.positions)
    assert a.scene.caption == b.scene.caption
    assert not torch.equal(a.video, world.clip(6, frames=24).video)
    assert not torch.equal(a.video, ToyWorld(seed=1).clip(5, frames=24).video)
    # any length, any start: a window of a long rollout equals the same window asked for directly
    long = world.clip(5, frames=3000)
    window = world.clip(5, frames=16, start=2984)
    assert torch.equal(long.video[2984:], window.video)
    assert long.video.shape == (3000, 3, 32, 32) and long.video.dtype == torch.uint8


def test_balls_stay_inside_the_frame(world):
    for seed in SEEDS:
        clip = world.clip(seed, frames=200)
        r = clip.scene.radius[None, :, None]
        assert (clip.positions >= r - 1e-9).all() and (clip.positions <= 32 - r + 1e-9).all()
    # pixels: nothing but background outside the discs of a one-ball scene
    cfg = ToyWorldConfig(min_balls=1, max_balls=1)
    clip = ToyWorld(cfg).clip(3, frames=50)
    ys, xs = np.mgrid[0:32, 0:32] + 0.5
    for t in range(0, 50, 7):
        (x, y), r = clip.positions[t, 0], clip.scene.radius[0]
        outside = np.hypot(xs - x, ys - y) > r + 0.5
        frame = clip.video[t].permute(1, 2, 0).numpy()
        assert (frame[outside] == np.array(cfg.background, np.uint8)).all()
        assert (frame[np.hypot(xs - x, ys - y) < r - 0.5] == np.array(PALETTE[clip.scene.colors[0]])).all()


def test_velocity_is_constant_except_at_bounces(world):
    bounces = 0
    for seed in SEEDS:
        clip = world.clip(seed, frames=120)
        step = np.diff(clip.positions, axis=0)              # [F-1, N, 2]
        smooth = ~clip.bounced[1:]                           # no bounce between t and t+1
        np.testing.assert_allclose(step[smooth], clip.velocities[:-1][smooth], atol=1e-9)
        # speed is preserved through bounces (elastic), only signs of components flip
        np.testing.assert_allclose(np.abs(clip.velocities), np.abs(clip.scene.vel)[None].repeat(120, 0), atol=1e-12)
        bounces += clip.bounced.sum()
        # a velocity component flips exactly where a bounce happened
        flipped = np.sign(clip.velocities[1:]) != np.sign(clip.velocities[:-1])
        assert (flipped.any(-1) == clip.bounced[1:]).all()
    assert bounces > 50


def test_captions_match_the_state(world):
    seen_speed = set()
    for seed in SEEDS:
        clip = world.clip(seed)
        colors, speed = parse_caption(clip.scene.caption)
        assert colors == clip.scene.colors and len(set(colors)) == len(colors)
        assert 1 <= len(colors) <= 3
        speeds = np.linalg.norm(clip.scene.vel, axis=-1)
        lo, hi = world.config.slow_speed if clip.scene.speed == "slowly" else world.config.fast_speed
        assert ((speeds >= lo) & (speeds <= hi)).all()
        assert speed in (None, clip.scene.speed)
        seen_speed.add(speed)
        assert all(w in TOY_VOCAB for w in toy_words(clip.scene.caption))
        state = clip.state()
        assert state["colors"] == colors and state["rgb"].tolist() == [list(PALETTE[c]) for c in colors]
    assert seen_speed == {None, *SPEED_WORDS}
    assert make_caption(["red", "blue"], "quickly") == "a red ball and a blue ball moving quickly"
    assert make_caption(["red", "green", "blue"]) == "a red ball, a green ball and a blue ball"
    assert parse_caption("A Red ball and a blue ball, slowly") == (["red", "blue"], "slowly")


def test_toy_samples_follow_the_shard_schema(world):
    sample = world.sample(7)
    c = DiTConfig.preset("toy").in_channels            # the default codec fits the toy DiT
    assert sample["latent"].shape == (c, 16, 8, 8)
    assert sample["text_emb"].shape == (16, 32) and sample["text_emb"][sample["text_len"]:].abs().max() == 0
    assert sample["meta"]["shape"] == [c, 16, 8, 8] and sample["meta"]["caption"] == sample["caption"]
    exact = load_autoencoder("toy:48")                  # the full basis: an exact codec, back to the frames
    pixels = exact.decode(world.sample(7, codec=exact)["latent"][None])[0]
    assert torch.equal(((pixels + 1) * 127.5).round().to(torch.uint8).transpose(0, 1), world.clip(7).video)
    batch = collate([world.sample(i) for i in range(3)])
    assert batch["latent"].shape == (3, c, 16, 8, 8) and batch["text_len"].shape == (3,)
    assert len(batch["state"]) == 3 and batch["state"][0]["positions"].shape[0] == 16


def test_toy_dataset_splits_across_workers():
    ds = ToyWorldDataset(length=6, frames=4)
    keys = [k for b in DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate) for k in b["key"]]
    assert sorted(keys) == [f"toy{i:09d}" for i in range(6)]
    endless = iter(ToyWorldDataset(frames=2))
    assert [next(endless)["key"] for _ in range(3)] == [f"toy{i:09d}" for i in range(3)]


def test_config_is_validated():
    with pytest.raises(ConfigError, match="unknown"):
        ToyWorldConfig(colors=("red", "mauve"))
    with pytest.raises(ConfigError, match="max_balls"):
        ToyWorldConfig(max_balls=4, colors=("red", "green", "blue"))
    big = ToyWorld(ToyWorldConfig(height=48, width=64, max_balls=1))
    assert big.clip(0, frames=3).video.shape == (3, 3, 48, 64)


def test_toy_codec_statistics_match_the_toy_world():
    """The toy codec's shipped statistics (models/) are what the toy world measures today: a
    change to the world's rendering must come with regenerated constants."""
    side = ToyWorldConfig().height
    for stride in [s for s in range(1, side + 1) if side % s == 0]:
        mean, std = measure_codec_statistics(stride)
        shipped_mean, shipped_std = toy_latent_stats(stride)
        torch.testing.assert_close(shipped_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(shipped_std, std, rtol=1e-12, atol=1e-12)


def test_toy_codec_cell_size_must_divide_the_frame():
    with pytest.raises(ForcelabError, match="cell size 3"):
        load_autoencoder("toy:6:3")


# ---------------------------------------------------------------------- background texture
TEXTURE = 60.0      # amplitude (pixel levels) of the textured world the tests use


def _reference_plain_render(world, scene, positions) -> np.ndarray:
    """The plain world's renderer written out in float64: discs over the constant background."""
    c = world.config
    ys, xs = np.mgrid[0:c.height, 0:c.width] + 0.5
    img = np.broadcast_to(np.array(c.background, np.float64), (len(positions), c.height, c.width, 3)).copy()
    for i, color in enumerate(scene.colors):
        d = np.hypot(xs - positions[:, i, 0, None, None], ys - positions[:, i, 1, None, None])
        alpha = np.clip(scene.radius[i] + 0.5 - d, 0, 1)[..., None]
        img += alpha * (np.array(PALETTE[color], np.float64) - img)
    return np.rint(img).astype(np.uint8)


def test_zero_texture_is_the_plain_world():
    plain, zero = ToyWorld(), ToyWorld(ToyWorldConfig(background_texture=0.0))
    for seed in (0, 5, 10 ** 6):
        a, b = plain.clip(seed, 12), zero.clip(seed, 12)
        assert torch.equal(a.video, b.video) and a.scene.background is None
        ref = _reference_plain_render(plain, a.scene, a.positions)
        assert np.abs(a.video.permute(0, 2, 3, 1).numpy().astype(int) - ref).max() <= 1   # float32 rounding


def test_texture_is_static_deterministic_and_in_range():
    world = ToyWorld(ToyWorldConfig(background_texture=TEXTURE))
    plain = ToyWorld()
    for seed in (1, 2, 10 ** 6 + 3):
        clip = world.clip(seed, 10)
        tex = clip.scene.background
        assert tex.shape == (32, 32, 3) and tex.min() >= 0 and tex.max() <= 255
        assert np.array_equal(tex, ToyWorld(ToyWorldConfig(background_texture=TEXTURE)).scene(seed).background)
        # the texture varies over the frame by a good part of its amplitude, and is not the plain colour
        assert (tex.max((0, 1)) - tex.min((0, 1))).max() > TEXTURE / 4
        # balls, motion and caption are those of the plain world
        base = plain.clip(seed, 10)
        assert base.scene.caption == clip.scene.caption and np.array_equal(base.positions, clip.positions)
        # static: every pixel that no ball covers in any frame is the texture in every frame
        ys, xs = np.mgrid[0:32, 0:32] + 0.5
        free = np.ones((32, 32), bool)
        for i, r in enumerate(clip.scene.radius):
            d = np.hypot(xs[None] - clip.positions[:, i, 0, None, None], ys[None] - clip.positions[:, i, 1, None, None])
            free &= (d >= r + 0.5).all(0)
        video = clip.video.permute(0, 2, 3, 1).numpy()
        assert free.sum() > 100
        assert np.array_equal(video[:, free], np.broadcast_to(np.rint(tex[free]).astype(np.uint8), video[:, free].shape))
    # scenes differ
    assert not np.array_equal(world.scene(1).background, world.scene(2).background)


def test_texture_is_a_sum_of_low_frequency_waves():
    """Independent check of the texture's spectrum: no energy above TEXTURE_MAX_CYCLES."""
    from forcelab.data.toyworld import TEXTURE_MAX_CYCLES
    world = ToyWorld(ToyWorldConfig(background=(100, 100, 100), background_texture=TEXTURE))
    tex = world.scene(4).background.astype(np.float64)        # no clipping with this base colour
    spectrum = np.abs(np.fft.fft2(tex, axes=(0, 1)))
    f = np.abs(np.fft.fftfreq(32, 1 / 32))
    high = (f[:, None] > TEXTURE_MAX_CYCLES) | (f[None, :] > TEXTURE_MAX_CYCLES)
    assert spectrum[high].max() < 1e-6 * spectrum.max()       # float32 storage


def test_texture_amplitude_is_validated():
    with pytest.raises(ConfigError, match="background_texture"):
        ToyWorldConfig(background_texture=-1.0)
