"""DiTConfig: every number of the causal DiT, with presets.

Shapes the model sees at run time (frames, latent height/width, text length actually given)
come from the input; everything else is a field here with a default and a one-line meaning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError, ForcelabError
from ..kernels.dispatch import BACKENDS
from ..validate import choice, non_negative_int, positive_float, positive_int

SINK_ROPE_POLICIES = ("true_distance", "adjacent")
ATTENTION_BACKENDS = (None, *BACKENDS)  # None: automatic
_POSITIVE_INTS = ("in_channels", "out_channels", "dim", "ffn_dim", "num_heads", "num_layers", "freq_dim",
                  "text_dim", "text_len", "rope_max_len", "chunk_frames")


@dataclass
class DiTConfig:
    # architecture (Wan2.1 names in comments)
    in_channels: int = 16                 # latent channels in (in_dim)
    out_channels: int = 16                # latent channels out (out_dim)
    dim: int = 1536                       # hidden width
    ffn_dim: int = 8960                   # feed-forward width
    num_heads: int = 12                   # attention heads; head dim = dim / num_heads
    num_layers: int = 30                  # transformer blocks
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (frames, rows, cols) per token
    freq_dim: int = 256                   # sinusoidal timestep embedding width
    text_dim: int = 4096                  # text encoder width (umT5-XXL)
    text_len: int = 512                   # context is zero-padded to this many tokens
    eps: float = 1e-6                     # RMSNorm / LayerNorm epsilon
    qk_norm: bool = True                  # RMSNorm on q and k over the full width
    cross_attn_norm: bool = True          # affine LayerNorm before cross-attention (norm3)
    rope_theta: float = 10000.0           # RoPE base
    rope_max_len: int = 1024              # RoPE table length per axis (positions must stay below)
    # causal student defaults (overridable per call / per cache)
    chunk_frames: int = 3                 # latent frames generated together
    window_frames: int | None = None      # attention window in frames (None = all past frames)
    sink_frames: int = 0                  # first frames kept visible forever
    sink_rope: str = "true_distance"      # sink position: true distance, or just before the window
    attention_backend: str | None = None  # None = automatic; "torch" | "triton"

    def __post_init__(self):
        try:  # every number once, here: a model with 0 heads or -1 layers cannot be built
            for name in _POSITIVE_INTS:
                setattr(self, name, positive_int(getattr(self, name), f"DiTConfig: {name}"))
            if len(tuple(self.patch_size)) != 3:
                raise ConfigError(f"DiTConfig: patch_size must be 3 numbers (frames, rows, cols), "
                                  f"got {self.patch_size!r}")
            self.patch_size = tuple(positive_int(p, "DiTConfig: patch_size entries") for p in self.patch_size)
            self.eps, self.rope_theta = positive_float(self.eps, "DiTConfig: eps"), \
                positive_float(self.rope_theta, "DiTConfig: rope_theta")
            if self.window_frames is not None:
                self.window_frames = positive_int(self.window_frames, "DiTConfig: window_frames (None: no window)")
            self.sink_frames = non_negative_int(self.sink_frames, "DiTConfig: sink_frames")
            choice(self.attention_backend, "DiTConfig: attention_backend", ATTENTION_BACKENDS)
        except ForcelabError as e:
            raise ConfigError(str(e)) from None
        if self.freq_dim % 2:
            raise ConfigError(f"DiTConfig: freq_dim ({self.freq_dim}) must be even (sin and cos halves)")
        if self.dim % self.num_heads:
            raise ConfigError(f"DiTConfig: dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"DiTConfig: head dim ({self.head_dim}) must be even for RoPE")
        if self.sink_rope not in SINK_ROPE_POLICIES:
            raise ConfigError(f"DiTConfig: sink_rope must be one of {SINK_ROPE_POLICIES}, got {self.sink_rope!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_axis_dims(self) -> tuple[int, int, int]:
        """Head-dim split of 3D RoPE (frames, rows, cols): Wan gives t the remainder."""
        d = self.head_dim
        hw = 2 * (d // 6)
        return d - 2 * hw, hw, hw

    def tokens_per_frame(self, height: int, width: int) -> int:
        """Tokens of one latent frame of size height x width."""
        _, ph, pw = self.patch_size
        return (height // ph) * (width // pw)

    def replace(self, **changes) -> "DiTConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides) -> "DiTConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown DiT preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    "wan2.1-t2v-1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # Wan in miniature, learnable in minutes on 2 CPU cores: 32x32 RGB toy frames through the
    # toy codec (models/autoencoder.py ToyCodec: 6 coefficients per 4x4 cell, 8x compression,
    # 25.8 dB PSNR on toy frames) give 6 x 8 x 8 latents -> 16 tokens per frame of 6 x 2 x 2 = 24
    # numbers through a 96-wide model (ratio 0.25; Wan2.1: 64 numbers through 1536, 0.04). The
    # former 48-channel space-to-depth latents (192 numbers through 64, ratio 3) did not learn.
    # Head dim 32: the Triton kernels' sizes (16, 32, 64, 128).
    "toy": dict(in_channels=6, out_channels=6, dim=96, ffn_dim=384, num_heads=3, num_layers=3,
                freq_dim=64, text_dim=32, text_len=16, chunk_frames=2),
}
