"""The toy world: balls bouncing in a box, a synthetic video world with known physics.

The embedded default of the suite (demo, ToyBench, tests): no files, seconds on a CPU.

    world = ToyWorld()                       # ToyWorldConfig: 32x32, 1-3 balls, ...
    clip = world.clip(seed=7, frames=200)    # any length: video uint8 [F, 3, H, W] + ground truth
    clip.positions, clip.velocities          # [F, N, 2] (x, y) in pixels, px/frame
    sample = world.sample(index=3)           # the latent-shard schema (data/schema.py) + "state"
    ds = ToyWorldDataset(world)              # an endless stream of such samples, split by rank/worker

Physics: each ball moves with constant velocity and bounces elastically off the walls (the
velocity component normal to the wall flips; speed is preserved). Balls do not collide with
each other; later balls are drawn over earlier ones. Positions have a closed form (a
triangle wave per axis), so frame t costs the same for t = 10 and t = 10^6 and a clip from any
start frame matches the same frames of a longer clip exactly.

Captions come from a tiny grammar naming the count and colors, optionally the speed:
"a red ball", "a red ball and a blue ball moving quickly",
"a red ball, a green ball and a blue ball moving slowly".
Everything is a pure function of (config, seed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset
from webdataset.utils import pytorch_worker_info

from ..errors import ConfigError
from ..models.autoencoder import (TOY_STATS_CLIPS, TOY_STD_FLOOR, VideoAutoencoder, load_autoencoder,
                                  toy_cell_basis)
from ..models.text_encoder import TextEncoder, load_text_encoder

# name -> RGB; distinct hues that a nearest-color classifier separates easily
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240),
    "yellow": (240, 220, 40), "magenta": (220, 50, 220), "cyan": (40, 220, 230),
}
SPEED_WORDS = ("slowly", "quickly")
HELD_OUT_SCENES = 10 ** 6        # scene seeds from here on: evaluation only, no training stage draws them
TEXTURE_WAVES = 3                 # background texture: sinusoids summed per colour channel
TEXTURE_MAX_CYCLES = 2            # their largest frequency, in cycles per frame side (low: the codec keeps it)
TEXTURE_STREAM = 0x7E7            # names the texture's random stream, apart from the scene's own draws


@dataclass
class ToyWorldConfig:
    height: int = 32                                  # frame height in pixels
    width: int = 32                                   # frame width in pixels
    frames: int = 16                                  # frames per sample (training clip length)
    fps: float = 8.0                                  # frame rate recorded in meta and used for mp4
    min_balls: int = 1                                # balls per scene, drawn uniformly in [min, max]
    max_balls: int = 3
    radius: tuple[float, float] = (2.5, 4.0)          # ball radius range in pixels
    slow_speed: tuple[float, float] = (0.4, 0.9)      # "slowly": speed range in pixels per frame
    fast_speed: tuple[float, float] = (1.4, 2.2)      # "quickly": speed range in pixels per frame
    speed_in_caption: float = 0.5                     # probability that the caption names the speed
    background: tuple[int, int, int] = (24, 24, 32)   # plain background RGB
    colors: tuple[str, ...] = tuple(PALETTE)          # palette names balls are drawn from
    background_texture: float = 0.0                   # amplitude (pixel levels) of a per-scene static
                                                      # low-frequency colour texture added to the background
                                                      # (not in the caption); 0 = the plain background

    def __post_init__(self):
        unknown = [c for c in self.colors if c not in PALETTE]
        if unknown:
            raise ConfigError(f"ToyWorldConfig.colors: unknown {unknown}; choose from {list(PALETTE)}")
        if not 1 <= self.min_balls <= self.max_balls <= len(self.colors):
            raise ConfigError(f"ToyWorldConfig: need 1 <= min_balls <= max_balls <= {len(self.colors)} colors, "
                              f"got {self.min_balls}..{self.max_balls}")
        if 2 * max(self.radius) >= min(self.height, self.width):
            raise ConfigError(f"ToyWorldConfig: radius {self.radius} does not fit a {self.height}x{self.width} frame")
        if not 0.0 <= self.background_texture <= 255.0:
            raise ConfigError(f"ToyWorldConfig.background_texture: {self.background_texture} is not an amplitude "
                              f"in pixel levels; give a value in [0, 255] (0: plain background)")
        self.background_texture = float(self.background_texture)
        self.radius, self.slow_speed, self.fast_speed = (tuple(float(v) for v in x) for x in
                                                         (self.radius, self.slow_speed, self.fast_speed))
        self.colors, self.background = tuple(self.colors), tuple(int(v) for v in self.background)


@dataclass
class Scene:
    """Initial state of one video: ball i has colors[i], radius[i], position pos0[i] = (x, y)
    at frame 0 and velocity vel[i] (px/frame, before any bounce)."""
    colors: list[str]
    radius: np.ndarray        # [N]
    pos0: np.ndarray          # [N, 2]
    vel: np.ndarray           # [N, 2]
    speed: str                # "slowly" | "quickly"
    caption: str
    background: np.ndarray | None = None   # float32 [H, W, 3] background image (None: the config's plain colour)


@dataclass
class ToyClip:
    video: torch.Tensor       # uint8 [F, 3, H, W]
    positions: np.ndarray     # [F, N, 2] ball centers (x, y) in pixels (pixel i spans [i, i+1))
    velocities: np.ndarray    # [F, N, 2] px/frame, the velocity moving away from frame t
    bounced: np.ndarray       # [F, N] bool: a wall bounce happened between frame t-1 and t
    scene: Scene
    start: int = 0            # index of the first frame

    def state(self) -> dict:
        """Ground truth as tensors for metrics (the "state" entry of a toy sample)."""
        return {"positions": torch.from_numpy(self.positions).float(),
                "velocities": torch.from_numpy(self.velocities).float(),
                "bounced": torch.from_numpy(self.bounced),
                "radius": torch.from_numpy(self.scene.radius).float(),
                "rgb": torch.tensor([PALETTE[c] for c in self.scene.colors], dtype=torch.uint8),
                "colors": list(self.scene.colors), "speed": self.scene.speed, "start": self.start}


def make_caption(colors: list[str], speed: str | None = None) -> str:
    balls = [f"a {c} ball" for c in colors]
    text = balls[0] if len(balls) == 1 else ", ".join(balls[:-1]) + " and " + balls[-1]
    return f"{text} moving {speed}" if speed else text


_BALL = re.compile(r"\b(?:a|an|one)\s+([a-z]+)\s+ball\b")


def parse_caption(caption: str) -> tuple[list[str], str | None]:
    """The colors (in order) and the speed word (or None) a toy caption names."""
    text = caption.lower()
    colors = [c for c in _BALL.findall(text) if c in PALETTE]
    speed = next((w for w in SPEED_WORDS if re.search(rf"\b{w}\b", text)), None)
    return colors, speed


def _fold(p0: np.ndarray, v: np.ndarray, lo: np.ndarray, hi: np.ndarray, t: np.ndarray):
    """Position and velocity at times t of a point bouncing between lo and hi (a triangle wave).

    p0, v, lo, hi: [...]; t: [T] -> positions, velocities, segment index [T, ...]."""
    span = hi - lo
    u = (p0 - lo) + v * t.reshape(-1, *([1] * p0.ndim))
    m = np.mod(u, 2 * span)
    forward = m < span
    pos = lo + np.where(forward, m, 2 * span - m)
    vel = np.where(forward, v, -v)
    return pos, vel, np.floor(u / span)


class ToyWorld:
    def __init__(self, config: ToyWorldConfig | None = None, seed: int = 0):
        self.config = config or ToyWorldConfig()
        self.seed = seed
        self._encoders = None  # the toy codec and text encoder, built on first use

    def scene(self, seed: int) -> Scene:
        """A random scene, a pure function of (config, world seed, seed)."""
        c = self.config
        rng = np.random.default_rng([self.seed, seed])
        n = int(rng.integers(c.min_balls, c.max_balls + 1))
        colors = [c.colors[i] for i in rng.permutation(len(c.colors))[:n]]
        radius = rng.uniform(*c.radius, size=n)
        size = np.array([c.width, c.height], dtype=np.float64)
        pos0 = radius[:, None] + rng.uniform(size=(n, 2)) * (size - 2 * radius[:, None])
        speed = SPEED_WORDS[int(rng.integers(2))]
        lo, hi = c.slow_speed if speed == "slowly" else c.fast_speed
        magnitude = rng.uniform(lo, hi, size=n)
        angle = rng.uniform(0, 2 * np.pi, size=n)
        vel = np.stack([np.cos(angle), np.sin(angle)], -1) * magnitude[:, None]
        named = rng.uniform() < c.speed_in_caption
        caption = make_caption(colors, speed if named else None)
        return Scene(colors, radius, pos0, vel, speed, caption, self.background(seed))

    def background(self, seed: int) -> np.ndarray | None:
        """Scene `seed`'s static background, float32 [H, W, 3] in [0, 255], or None (plain).

        background + amplitude * p(x, y) per channel, p in [0, 1] the mean of TEXTURE_WAVES
        terms (1 + sin(2 pi (fx x / W + fy y / H) + phase)) / 2 with integer frequencies
        |fx|, |fy| <= TEXTURE_MAX_CYCLES (not both 0), drawn from its own stream, so the
        scene's balls, motion and caption are those of the plain world."""
        c = self.config
        if c.background_texture == 0:
            return None
        rng = np.random.default_rng([self.seed, seed, TEXTURE_STREAM])
        ys, xs = np.mgrid[0:c.height, 0:c.width].astype(np.float64) + 0.5
        pattern = np.zeros((c.height, c.width, 3))
        for channel in range(3):
            for _ in range(TEXTURE_WAVES):
                fx, fy = 0, 0
                while fx == 0 and fy == 0:
                    fx, fy = rng.integers(-TEXTURE_MAX_CYCLES, TEXTURE_MAX_CYCLES + 1, size=2)
                phase = rng.uniform(0, 2 * np.pi)
                wave = np.sin(2 * np.pi * (fx * xs / c.width + fy * ys / c.height) + phase)
                pattern[..., channel] += (1 + wave) / (2 * TEXTURE_WAVES)
        image = np.array(c.background, np.float64) + c.background_texture * pattern
        return np.clip(image, 0, 255).astype(np.float32)

    def trajectory(self, scene: Scene, frames: int, start: int = 0):
        """positions, velocities [F, N, 2] and bounced [F, N] for frames start .. start+frames-1."""
        t = np.arange(start - 1, start + frames, dtype=np.float64)
        pos, vel, segment = self._fold(scene, t)
        bounced = (segment[1:] != segment[:-1]).any(-1)
        return pos[1:], vel[1:], bounced

    def positions_at(self, scene: Scene, times) -> np.ndarray:
        """Ball centres [T, N, 2] at any real times [T] (in frames; fractions and reversed or
        slowed clocks included): the closed form that trajectory samples at whole frames."""
        return self._fold(scene, np.asarray(times, np.float64).reshape(-1))[0]

    def _fold(self, scene: Scene, t: np.ndarray):
        c = self.config
        r = scene.radius[:, None]
        lo, hi = r * np.ones(2), np.array([c.width, c.height]) - r
        return _fold(scene.pos0, scene.vel, lo, hi, t)

    def render(self, scene: Scene, positions: np.ndarray) -> torch.Tensor:
        """uint8 [F, 3, H, W]: antialiased discs (coverage = r + 0.5 - distance) on the background."""
        c = self.config
        ys, xs = np.mgrid[0:c.height, 0:c.width].astype(np.float32) + 0.5
        background = np.array(c.background, np.float32) if scene.background is None else scene.background
        img = np.broadcast_to(background, (len(positions), c.height, c.width, 3)).copy()
        for i, color in enumerate(scene.colors):
            x = positions[:, i, 0, None, None].astype(np.float32)
            y = positions[:, i, 1, None, None].astype(np.float32)
            alpha = np.clip(scene.radius[i] + 0.5 - np.sqrt((xs - x) ** 2 + (ys - y) ** 2), 0, 1)[..., None]
            img += alpha * (np.array(PALETTE[color], np.float32) - img)
        return torch.from_numpy(np.rint(img).astype(np.uint8)).permute(0, 3, 1, 2).contiguous()

    def clip(self, seed: int, frames: int | None = None, start: int = 0) -> ToyClip:
        """Frames start .. start+frames-1 of scene `seed` (frames defaults to config.frames)."""
        frames = self.config.frames if frames is None else frames
        scene = self.scene(seed)
        positions, velocities, bounced = self.trajectory(scene, frames, start)
        return ToyClip(self.render(scene, positions), positions, velocities, bounced, scene, start)

    def sample(self, index: int, codec: VideoAutoencoder | None = None, text_encoder: TextEncoder | None = None,
               frames: int | None = None) -> dict:
        """Sample `index` in the latent-shard schema, plus "state" (the ground truth).
        codec / text_encoder default to the toy ones."""
        if codec is None or text_encoder is None:
            self._encoders = self._encoders or (load_autoencoder("toy"), load_text_encoder("toy"))
            codec, text_encoder = codec or self._encoders[0], text_encoder or self._encoders[1]
        clip = self.clip(index, frames)
        pixels = clip.video.float().div(127.5).sub(1.0).permute(1, 0, 2, 3)[None]  # [1, 3, F, H, W]
        latent = codec.encode(pixels)[0]
        emb, lengths = text_encoder.encode([clip.scene.caption])
        text_len = lengths.tolist()[0]           # host data: no device read
        c = self.config
        meta = {"source": f"toyworld:{self.seed}:{index}", "caption": clip.scene.caption, "fps": c.fps,
                "frames": len(clip.video), "size": [c.height, c.width], "shape": list(latent.shape),
                "dtype": "float32", "vae": codec.name, "text_encoder": text_encoder.name,
                "text_len": text_len, "text_max_length": text_encoder.max_length}
        return {"latent": latent, "text_emb": emb[0], "text_len": text_len,
                "caption": clip.scene.caption, "meta": meta, "key": f"toy{index:09d}", "state": clip.state()}


def measure_codec_statistics(stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coefficient mean and std [3*s*s] (float64) of toy-world frames in toy_cell_basis(s),
    over TOY_STATS_CLIPS seeded clips of the default world: what the toy codec normalises with
    (models/autoencoder.py ships them as constants; a test checks they still match)."""
    world = ToyWorld(seed=0)
    video = torch.cat([world.clip(i).video for i in range(TOY_STATS_CLIPS)])      # [N, 3, H, W] uint8
    cells = F.pixel_unshuffle(video.double().div(127.5).sub(1.0), stride)          # [N, 3ss, h, w]
    coef = torch.einsum("kc,nchw->knhw", toy_cell_basis(stride), cells).flatten(1)
    return coef.mean(1), coef.std(1).clamp_min(TOY_STD_FLOOR)


class ToyWorldDataset(IterableDataset):
    """Toy samples `first_index + i` for i = 0, 1, ... (endless when length is None), dealt out
    across ranks and DataLoader workers so each index is produced exactly once.

    codec / text_encoder: objects or specs for load_autoencoder / load_text_encoder ("toy")."""

    def __init__(self, world: ToyWorld | None = None, codec="toy", text_encoder="toy",
                 length: int | None = None, first_index: int = 0, frames: int | None = None):
        self.world = world or ToyWorld()
        self.codec = load_autoencoder(codec) if isinstance(codec, str) else codec
        self.text_encoder = load_text_encoder(text_encoder) if isinstance(text_encoder, str) else text_encoder
        self.length, self.first_index, self.frames = length, first_index, frames
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Endless mode: epoch e continues with fresh scenes; fixed length: the same scenes."""
        self.epoch = epoch

    def __iter__(self):
        rank, world, worker, workers = pytorch_worker_info()
        stride, offset = world * workers, rank * workers + worker
        base = self.first_index + (self.epoch << 40 if self.length is None else 0)
        i = offset
        while self.length is None or i < self.length:
            yield self.world.sample(base + i, self.codec, self.text_encoder, self.frames)
            i += stride
