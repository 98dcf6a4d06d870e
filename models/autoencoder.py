"""Video autoencoders behind one small protocol: the toy codec and the Wan VAE.

    ae = load_autoencoder("toy")                  # or a local diffusers directory
    z = ae.encode(video)                          # [B, 3, F, H, W] in [-1, 1] -> [B, C, F', H', W']
    video = ae.decode(z)                          # -> [B, 3, F, H, W] in [-1, 1]

    stream = ae.decode_stream()                   # streaming decode, chunk by chunk:
    for chunk in latent_chunks:                   #   chunk [B, C, f, H', W'] (any f >= 1)
        frames = stream.push(chunk)               #   -> the pixel frames it completes [B, 3, f', H, W]

Latents are normalised (roughly zero mean, unit variance per channel) so the DiT never
sees encoder-specific statistics. Frame counts: F' = 1 + (F - 1) / temporal_stride
(the Wan VAE wants F = 4k + 1; the toy codec has stride 1, so F' = F, unless built with a
temporal stride: "toy:C:S:T", a causal Wan-like layout for tests).
Pushing latent frames one at a time to a stream yields exactly what `decode` gives for the
whole clip (both codecs are causal in time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ..dtypes import parse_dtype
from ..errors import ForcelabError
from .checkpoint import require_safetensors

# Per-channel statistics of Wan2.1 VAE latents (z = (mu - mean) / std); diffusers stores the
# same numbers in the config as latents_mean / latents_std, which win when present.
WAN_LATENT_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                   0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN_LATENT_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                  3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


@runtime_checkable
class DecodeStream(Protocol):
    def push(self, latent: torch.Tensor) -> torch.Tensor:
        """Decode the next latent frames [B, C, f, H', W'] -> the pixel frames [B, 3, f', H, W]."""


@runtime_checkable
class VideoAutoencoder(Protocol):
    name: str               # identifier recorded in shard meta ("toy-dct-s4-c6", "wan-vae:<dir>")
    latent_channels: int    # C of the latent
    temporal_stride: int    # pixel frames per latent frame (after the first)
    spatial_stride: int     # pixels per latent cell along H and W

    def encode(self, video: torch.Tensor) -> torch.Tensor: ...
    def decode(self, latent: torch.Tensor) -> torch.Tensor: ...
    def decode_stream(self) -> DecodeStream: ...


def latent_frames(ae: VideoAutoencoder, frames: int) -> int:
    """Latent frames for `frames` pixel frames (1 + (F - 1) / stride)."""
    return 1 + (frames - 1) // ae.temporal_stride


def pixel_frames(ae: VideoAutoencoder, latent_frames: int) -> int:
    """Pixel frames decoded from `latent_frames` latent frames."""
    return 1 + (latent_frames - 1) * ae.temporal_stride


def check_video_shape(ae: VideoAutoencoder, video: torch.Tensor) -> None:
    """Raise a ForcelabError unless video is [B, 3, F, H, W] with sizes the encoder accepts."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise ForcelabError(f"{ae.name}: expected a video [B, 3, F, H, W], got shape {list(video.shape)}")
    _, _, f, h, w = video.shape
    s, t = ae.spatial_stride, ae.temporal_stride
    if h % s or w % s:
        raise ForcelabError(f"{ae.name}: height and width must be multiples of {s}, got {h}x{w}")
    if (f - 1) % t:
        raise ForcelabError(f"{ae.name}: needs {t}k+1 frames (e.g. {t * ((f - 1) // t) + 1}), got {f}")


# Orthonormal colour axes of the toy codec: luma, then two opponent-colour (chroma) axes.
TOY_COLOUR_AXES = ((1.0, 1.0, 1.0), (1.0, -1.0, 0.0), (1.0, 1.0, -2.0))
TOY_STATS_CLIPS = 64        # toy-world clips (default config, world seed 0) the latent statistics come from


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix [n, n] (float64): row k is frequency k over positions."""
    i = torch.arange(n, dtype=torch.float64)
    k = i[:, None]
    m = torch.cos(torch.pi * (i[None, :] + 0.5) * k / n) * (2.0 / n) ** 0.5
    m[0] /= 2 ** 0.5
    return m


def toy_cell_basis(stride: int) -> torch.Tensor:
    """Orthonormal basis of one stride x stride RGB cell, [3*s*s, 3*s*s] float64, one basis
    vector per row in the pixel_unshuffle channel order (c*s*s + dy*s + dx).

    Vector (axis a, ky, kx) = colour axis a (TOY_COLOUR_AXES, normalised) x 2D DCT (ky, kx).
    Rows are sorted coarse to fine: by frequency ky + kx, then colour axis (luma first), so the
    first 3 rows are the cell's mean colour, the next 2 its luma gradients, then the chroma
    gradients, and so on; keeping the first C rows is a low-pass, colour-aware compression."""
    colours = torch.tensor(TOY_COLOUR_AXES, dtype=torch.float64)
    colours = colours / colours.norm(dim=1, keepdim=True)
    d = dct_matrix(stride)
    keys = sorted((ky + kx, a, ky, kx) for a in range(3) for ky in range(stride) for kx in range(stride))
    rows = [(colours[a][:, None, None] * torch.outer(d[ky], d[kx])[None]).reshape(-1) for _, a, ky, kx in keys]
    return torch.stack(rows)


TOY_STD_FLOOR = 1e-3        # smallest per-coefficient std the toy codec divides by
# The toy world's per-coefficient statistics for every cell size that divides its 32x32 frames,
# measured by data/toyworld.py measure_codec_statistics (a test checks they still match).
TOY_STATS_FILE = Path(__file__).with_name("toy_codec_stats.safetensors")
_TOY_STATS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def toy_latent_stats(stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coefficient mean and std [3*s*s] (float64) of toy-world frames in toy_cell_basis(s)
    (TOY_STATS_CLIPS seeded clips of the default world), read once per process."""
    if not _TOY_STATS:
        table = load_file(TOY_STATS_FILE)
        strides = sorted(int(k.removeprefix("mean_s")) for k in table if k.startswith("mean_s"))
        _TOY_STATS.update({s: (table[f"mean_s{s}"], table[f"std_s{s}"]) for s in strides})
    if stride not in _TOY_STATS:
        raise ForcelabError(f"toy codec: cell size {stride} does not divide the toy world's frames; "
                            f"choose one of {sorted(_TOY_STATS)}")
    return _TOY_STATS[stride]


class ToyCodec:
    """The toy autoencoder: a fixed orthonormal transform of each s x s pixel cell, keeping the
    first `channels` coefficients (see toy_cell_basis), normalised per channel.

    [B, 3, F, H, W] in [-1, 1] -> [B, C, F, H/s, W/s]; z = (basis[:C] @ cell - mean) / std with
    the toy world's per-channel statistics (as the Wan VAE normalises its latents), so toy-world
    latents have about zero mean and unit variance per channel. decode is the transpose: exact
    on the kept subspace (decode(encode(decode(z))) == decode(z)), the orthogonal projection of
    any video onto it, and the exact inverse when C = 3*s*s. No training, no download.

    Default C = 6 at s = 4 (48 -> 6 numbers per cell, 8x compression): 32x32 toy frames give
    6 x 8 x 8 latents, what DiTConfig.preset("toy") expects; 25.8 dB PSNR on toy frames.

    temporal_stride T > 1 compresses time causally, laid out like the Wan VAE: latent 0 is
    frame 0 alone, latent k >= 1 the mean of frames 1 + T(k-1) .. Tk (per coefficient). Decoding
    ramps each group from the frame decoded before it, p: frame j = 1..T of group k is
    p + 2j / (T + 1) * (z[k] - p) (the group's mean is z[k], so decode is still exact on its own
    output). So, as with Wan, a latent decodes differently with its past than alone (alone it
    is a clip's first latent: one frame, z[k] itself), and the past fades (by a factor
    (T - 1) / (T + 1) per latent) but never ends. T = 1 is the per-frame codec. For tests of
    code that must give the VAE its temporal context.
    """

    def __init__(self, channels: int = 6, stride: int = 4, temporal_stride: int = 1):
        if stride < 1 or not 1 <= channels <= 3 * stride * stride or temporal_stride < 1:
            raise ForcelabError(f"toy codec: need stride >= 1, temporal stride >= 1 and 1 <= channels <= "
                                f"3*stride^2 ({3 * stride * stride}), got channels {channels}, stride {stride}, "
                                f"temporal stride {temporal_stride}")
        self.spatial_stride = stride
        self.temporal_stride = temporal_stride
        self.latent_channels = channels
        self.name = f"toy-dct-s{stride}-c{channels}" + (f"-t{temporal_stride}" if temporal_stride > 1 else "")
        mean, std = toy_latent_stats(stride)
        self.basis = toy_cell_basis(stride)[:channels].float()            # [C, 3*s*s]
        self.mean = mean[:channels].float().view(1, -1, 1, 1)
        self.std = std[:channels].float().view(1, -1, 1, 1)

    def _consts(self, like: torch.Tensor):
        return tuple(t.to(like.device, like.dtype) for t in (self.basis, self.mean, self.std))

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        check_video_shape(self, video)
        b, c, f, h, w = video.shape
        cells = F.pixel_unshuffle(video.transpose(1, 2).reshape(b * f, c, h, w), self.spatial_stride)
        basis, mean, std = self._consts(cells)
        z = (torch.einsum("kc,nchw->nkhw", basis, cells) - mean) / std
        z = z.reshape(b, f, *z.shape[1:]).transpose(1, 2)                  # [B, C, F, h, w]
        t = self.temporal_stride
        if t > 1:   # latent 0: frame 0; latent k: the mean of its group of t frames
            groups = z[:, :, 1:].unflatten(2, ((f - 1) // t, t)).mean(3)
            z = torch.cat([z[:, :, :1], groups], dim=2)
        return z.contiguous()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.ndim != 5 or latent.shape[1] != self.latent_channels:
            raise ForcelabError(f"{self.name}: expected a latent [B, {self.latent_channels}, F, H, W], "
                                f"got shape {list(latent.shape)}")
        return self._pixels(self._ramp(latent))

    def _ramp(self, latent: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """Latents [B, C, n, h, w] -> per-frame coefficients [B, C, f, h, w]. `last` [B, C, h, w]:
        the frame decoded before them (None: latent 0 starts a clip, one frame)."""
        t = self.temporal_stride
        if t == 1:
            return latent
        w = [2.0 * j / (t + 1) for j in range(1, t + 1)]
        frames = []
        for k in range(latent.shape[2]):
            z = latent[:, :, k]
            frames.extend([z] if last is None else [last + wj * (z - last) for wj in w])
            last = frames[-1]
        return torch.stack(frames, dim=2)

    def _pixels(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Per-frame coefficients [B, C, F, h, w] -> video [B, 3, F, H, W]."""
        b, c, f, h, w = coefficients.shape
        z = coefficients.transpose(1, 2).reshape(b * f, c, h, w)
        basis, mean, std = self._consts(z)
        cells = torch.einsum("kc,nkhw->nchw", basis, z * std + mean)
        x = F.pixel_shuffle(cells, self.spatial_stride)
        return x.reshape(b, f, *x.shape[1:]).transpose(1, 2).contiguous()

    def decode_stream(self) -> "_ToyStream":
        return _ToyStream(self)


class _ToyStream:
    """Decoding carries only the last decoded frame's coefficients from chunk to chunk."""

    def __init__(self, codec: ToyCodec):
        self.codec = codec
        self.last: torch.Tensor | None = None

    def push(self, latent: torch.Tensor) -> torch.Tensor:
        coefficients = self.codec._ramp(latent, self.last)
        self.last = coefficients[:, :, -1]
        return self.codec._pixels(coefficients)


class WanVAE:
    """The Wan2.1 causal 3D VAE (diffusers AutoencoderKLWan) with normalised latents.

    encode: z = (mu - mean) / std (the posterior mean, no sampling); decode: z * std + mean.
    Input frames must be 4k+1; latents have 16 channels at 1/4 the frames and 1/8 the size.
    """

    def __init__(self, vae, name: str = "wan-vae"):
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.name = name
        self.latent_channels = int(cfg.z_dim)
        self.temporal_stride = int(2 ** sum(bool(t) for t in cfg.temperal_downsample))
        self.spatial_stride = int(2 ** (len(cfg.dim_mult) - 1)) * int(getattr(cfg, "patch_size", None) or 1)
        mean = getattr(cfg, "latents_mean", None) or WAN_LATENT_MEAN
        std = getattr(cfg, "latents_std", None) or WAN_LATENT_STD
        if len(mean) != self.latent_channels or len(std) != self.latent_channels:
            raise ForcelabError(f"{name}: latents_mean/std have {len(mean)}/{len(std)} entries "
                                f"but z_dim is {self.latent_channels}; fix the VAE config.json")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean.to(like.device, like.dtype), self.std.to(like.device, like.dtype)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        check_video_shape(self, video)
        mu = self.vae.encode(video.to(self.device, self.dtype)).latent_dist.mean
        mean, std = self._stats(mu)
        return (mu - mean) / std

    def _denormalise(self, latent: torch.Tensor) -> torch.Tensor:
        z = latent.to(self.device, self.dtype)
        mean, std = self._stats(z)
        return z * std + mean

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self._denormalise(latent)).sample

    def decode_stream(self) -> "_WanDecodeStream":
        return _WanDecodeStream(self)


class _WanDecodeStream:
    """Decode one latent frame at a time through the VAE's causal conv cache.

    This drives diffusers' own decoder the way AutoencoderKLWan._decode does internally, but
    keeps the feature cache here so chunks can arrive over time. The first latent frame gives
    1 pixel frame, each later one `temporal_stride` frames; the result equals decode() of the
    whole latent. Tiled decoding is not used on this path.
    """

    def __init__(self, wan: WanVAE):
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        self.wan = wan
        n = sum(isinstance(m, WanCausalConv3d) for m in wan.vae.decoder.modules())
        self.cache: list = [None] * n
        self.first = True

    @torch.no_grad()
    def push(self, latent: torch.Tensor) -> torch.Tensor:
        vae = self.wan.vae
        x = vae.post_quant_conv(self.wan._denormalise(latent))
        outs = []
        for i in range(x.shape[2]):
            outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=self.cache, feat_idx=[0],
                                    first_chunk=self.first))
            self.first = False
        out = torch.cat(outs, 2)
        patch = getattr(vae.config, "patch_size", None)
        if patch is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
            out = unpatchify(out, patch_size=patch)
        return out.clamp(-1.0, 1.0)


def load_autoencoder(spec: str, dtype=None, device=None) -> VideoAutoencoder:
    """"toy" (or "toy:C" for C latent channels, "toy:C:S" also for cell size S, "toy:C:S:T" also for
    temporal stride T) -> ToyCodec; a local
    directory in diffusers format (AutoencoderKLWan config.json + weights, or a pipeline folder
    with vae/) -> WanVAE. dtype: torch dtype or "bf16"/"fp16"/"fp32"; the Wan VAE defaults to fp32."""
    spec = str(spec)
    if spec == "toy" or spec.startswith("toy:"):
        try:
            parts = [int(v) for v in spec.split(":")[1:]]
            if len(parts) > 3:
                raise ValueError(spec)
            return ToyCodec(*parts)
        except ValueError:
            raise ForcelabError(f"autoencoder {spec!r}: write toy, toy:CHANNELS, toy:CHANNELS:STRIDE or "
                                f"toy:CHANNELS:STRIDE:TEMPORAL_STRIDE (integers)") from None
    path = Path(spec).expanduser()
    if (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if not (path / "config.json").is_file():
        raise ForcelabError(
            f"autoencoder {spec}: not found - expected 'toy' or a local directory holding a diffusers "
            f"AutoencoderKLWan (config.json + diffusion_pytorch_model.safetensors, e.g. the vae/ folder "
            f"of Wan2.1-T2V-1.3B-Diffusers)")
    from diffusers import AutoencoderKLWan

    require_safetensors(path, "autoencoder")
    try:
        vae = AutoencoderKLWan.from_pretrained(str(path), torch_dtype=parse_dtype(dtype) or torch.float32,
                                               use_safetensors=True)
    except (OSError, ValueError, KeyError) as e:
        raise ForcelabError(f"autoencoder {path}: cannot load as AutoencoderKLWan ({e})") from None
    if device is not None:
        vae = vae.to(device)
    return WanVAE(vae, name=f"wan-vae:{path.parent.name + '/' if path.name == 'vae' else ''}{path.name}")


def save_tiny_wan_vae(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny random AutoencoderKLWan (base_dim 8, 16 latent channels) for tests and smoke
    runs: encode [1, 3, 9, 32, 48] -> [1, 16, 3, 4, 6] in a fraction of a second on CPU."""
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    vae.save_pretrained(str(path))
    return Path(path)
