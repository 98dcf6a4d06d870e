"""First-frame / prefix conditioning for generation: image-to-video and video extension.

    cond = PrefixInput.from_options(image, video, prefix_frames, plan.name)   # None without either
    pixels = cond.pixels(ae, unit, (H, W))      # [1, 3, n, H, W] in [-1, 1]
    prefix = ae.encode(pixels)                  # clean latents [1, C, p, h, w], p a multiple of `unit`

The prefix is committed to the KV cache before the rollout (`stream(..., prefix=...)`) and the
generated frames continue it; the output video starts with the decoded prefix.

A causal student starts chunks at chunk boundaries, so the prefix is a whole number of
chunks (blocks): `--video` takes its first `--prefix-frames` frames (default: one chunk's
worth), `--image` is held still for one chunk (the still clip of that many frames is
encoded, which is what a static first chunk encodes to, also with a temporally compressing
VAE). Size: without --height/--width the input's own size is used (it must fit the model's
grid); with them, the input is scaled to cover that size and center-cropped (as preprocess
does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ForcelabError
from ..models.autoencoder import latent_frames, pixel_frames


@dataclass
class PrefixInput:
    kind: str                           # "image" | "video"
    path: Path
    prefix_frames: int | None           # --prefix-frames (video only; None: one chunk)
    size: tuple[int, int]               # the input's own (H, W)

    @property
    def flag(self) -> str:
        return f"--{self.kind} {self.path}"

    @classmethod
    def from_options(cls, image=None, video=None, prefix_frames: int | None = None,
                     plan: str = "chunkwise") -> "PrefixInput | None":
        """Check the conditioning options (before any heavy work): an image or a video (with
        the frames to take from it) for a causal plan; None without either."""
        if prefix_frames is not None and not video:
            raise ForcelabError("--prefix-frames goes with --video (an --image is one frame)")
        if not image and not video:
            return None
        if image and video:
            raise ForcelabError("give --image or --video, not both")
        if plan == "teacher":
            raise ForcelabError("--image/--video need a causal plan (chunkwise, rolling, step_matrix): the "
                                "teacher samples a whole clip at once and cannot continue given frames")
        kind = "image" if image else "video"
        path = Path(image or video).expanduser()
        if not path.is_file():
            raise ForcelabError(f"--{kind} {path}: file not found")
        if prefix_frames is not None and prefix_frames < 1:
            raise ForcelabError(f"--prefix-frames must be >= 1, got {prefix_frames}")
        from ..data.video import VideoError, probe_video

        try:
            info = probe_video(path, backend="pyav")     # PyAV also reads PNG / JPEG images
        except VideoError as e:
            raise ForcelabError(f"--{kind} {path}: cannot read it ({_reason(e, path)})") from None
        return cls(kind, path, prefix_frames, (info.height, info.width))

    def check_size(self, height: int, width: int, cell: int, resized: bool) -> None:
        if not resized and (height % cell or width % cell):
            raise ForcelabError(f"{self.flag}: its size {height}x{width} is not a multiple of {cell} (the model's "
                                f"grid); pass --height/--width to scale and crop it to a size that is")

    def frames(self, ae, unit: int) -> int:
        """Pixel frames the prefix spans: whole chunks of `unit` latent frames."""
        if self.kind == "image" or self.prefix_frames is None:
            return pixel_frames(ae, unit)
        n = self.prefix_frames
        if (n - 1) % ae.temporal_stride or latent_frames(ae, n) % unit:
            good = [pixel_frames(ae, k * unit) for k in range(1, 5)]
            raise ForcelabError(f"--prefix-frames {n}: the prefix must be whole chunks of {unit} latent frames "
                                f"(autoencoder stride {ae.temporal_stride}): e.g. {good}")
        return n

    def pixels(self, ae, unit: int, size: tuple[int, int]) -> torch.Tensor:
        """The prefix clip [1, 3, n, H, W] in [-1, 1], scaled and cropped to `size`."""
        from ..data.video import VideoError, read_video

        n = self.frames(ae, unit)
        try:
            clip = read_video(self.path, frames=1 if self.kind == "image" else n, size=tuple(size),
                              dtype="float", backend="pyav")
        except VideoError as e:
            raise ForcelabError(f"{self.flag}: {_reason(e, self.path)}") from None
        if self.kind == "image":
            clip = clip.expand(n, -1, -1, -1)            # held still for the first chunk
        return clip.permute(1, 0, 2, 3)[None].contiguous()

    def read(self, ae, unit: int, size: tuple[int, int], latent: int, frames: int) -> tuple[torch.Tensor, int]:
        """(pixels [1, 3, n, H, W], latent frames p of the prefix) for a video of `latent`
        latent frames (`frames` video frames) in all, which must leave room to continue."""
        pixels = self.pixels(ae, unit, size)
        p = latent_frames(ae, pixels.shape[2])
        if latent <= p:
            raise ForcelabError(f"--frames {frames}: the video holds the {pixels.shape[2]} given frames and "
                                f"continues them; ask for more, e.g. --frames {pixel_frames(ae, p + unit)}")
        return pixels, p

    def describe(self, ae, unit: int) -> dict:
        return {"kind": self.kind, "path": str(self.path), "input_size": list(self.size),
                "prefix_frames": self.frames(ae, unit), "held_still": self.kind == "image"}


def _reason(e: Exception, path: Path) -> str:
    """The error's message without the path it starts with (the flag names it already)."""
    text = str(e)
    return text[len(str(path)) + 2:] if text.startswith(f"{path}: ") else text
