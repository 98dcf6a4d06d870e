"""Video autoencoders behind one small protocol: the exact toy pixel codec and the Wan VAE.

    ae = load_autoencoder("toy")                  # or a local diffusers directory
    z = ae.encode(video)                          # [B, 3, F, H, W] in [-1, 1] -> [B, C, F', H', W']
    video = ae.decode(z)                          # -> [B, 3, F, H, W] in [-1, 1]

    stream = ae.decode_stream()                   # streaming decode, chunk by chunk:
    for chunk in latent_chunks:                   #   chunk [B, C, f, H', W'] (any f >= 1)
        frames = stream.push(chunk)               #   -> the pixel frames it completes [B, 3, f', H, W]

Latents are normalised (roughly zero mean, unit variance per channel) so the DiT never
sees encoder-specific statistics. Frame counts: F' = 1 + (F - 1) / temporal_stride
(the Wan VAE wants F = 4k + 1; the toy codec has stride 1, so F' = F).
Pushing latent frames one at a time to a stream yields exactly what `decode` gives for the
whole clip (the Wan VAE is causal in time; the toy codec is per frame).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from ..config import parse_dtype
from ..errors import ForcelabError

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
    name: str               # identifier recorded in shard meta ("toy-pixel-s4", "wan-vae:<dir>")
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


class ToyPixelCodec:
    """Exact, invertible codec: pixels in [-1, 1] rearranged by space-to-depth.

    [B, 3, F, H, W] -> [B, 3*s*s, F, H/s, W/s], channel index c*s*s + dy*s + dx (pixel_unshuffle
    order). With s = 4, 32x32 RGB frames give 48 x 8 x 8 latents, what DiTConfig.preset("toy")
    expects. Values stay in [-1, 1]: no further normalisation is needed.
    """

    temporal_stride = 1

    def __init__(self, factor: int = 4):
        if factor < 1:
            raise ForcelabError(f"toy codec: factor must be >= 1, got {factor}")
        self.spatial_stride = factor
        self.latent_channels = 3 * factor * factor
        self.name = f"toy-pixel-s{factor}"

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        check_video_shape(self, video)
        b, c, f, h, w = video.shape
        x = video.transpose(1, 2).reshape(b * f, c, h, w)
        z = F.pixel_unshuffle(x, self.spatial_stride)
        return z.reshape(b, f, *z.shape[1:]).transpose(1, 2).contiguous()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.ndim != 5 or latent.shape[1] != self.latent_channels:
            raise ForcelabError(f"{self.name}: expected a latent [B, {self.latent_channels}, F, H, W], "
                                f"got shape {list(latent.shape)}")
        b, c, f, h, w = latent.shape
        x = F.pixel_shuffle(latent.transpose(1, 2).reshape(b * f, c, h, w), self.spatial_stride)
        return x.reshape(b, f, *x.shape[1:]).transpose(1, 2).contiguous()

    def decode_stream(self) -> "_PerFrameStream":
        return _PerFrameStream(self)


class _PerFrameStream:
    def __init__(self, codec: ToyPixelCodec):
        self.codec = codec

    def push(self, latent: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latent)


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
    """"toy" (or "toy:S" for space-to-depth factor S) -> ToyPixelCodec; a local directory in
    diffusers format (AutoencoderKLWan config.json + weights, or a pipeline folder with vae/)
    -> WanVAE. dtype: torch dtype or "bf16"/"fp16"/"fp32"; the Wan VAE defaults to fp32."""
    spec = str(spec)
    if spec == "toy" or spec.startswith("toy:"):
        try:
            return ToyPixelCodec(int(spec.split(":", 1)[1]) if ":" in spec else 4)
        except ValueError:
            raise ForcelabError(f"autoencoder {spec!r}: write toy or toy:FACTOR (an integer)") from None
    path = Path(spec).expanduser()
    if (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if not (path / "config.json").is_file():
        raise ForcelabError(
            f"autoencoder {spec}: not found - expected 'toy' or a local directory holding a diffusers "
            f"AutoencoderKLWan (config.json + diffusion_pytorch_model.safetensors, e.g. the vae/ folder "
            f"of Wan2.1-T2V-1.3B-Diffusers)")
    from diffusers import AutoencoderKLWan

    try:
        vae = AutoencoderKLWan.from_pretrained(str(path), torch_dtype=parse_dtype(dtype) or torch.float32)
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
