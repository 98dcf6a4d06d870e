"""Video files: read a clip (decord when installed, else PyAV - the same frames) and write mp4.

    clip = read_video("a.mp4", fps=16, frames=81, size=(480, 832))   # uint8 [F, 3, H, W]
    clip = read_video("a.mp4", fps=16, frames=81, size=(480, 832), dtype="float")  # [-1, 1]
    write_video("out.mp4", frames_uint8_FHW3, fps=16)

Rotation: a video carrying rotation metadata (a display matrix, as phones write) is decoded
upright, as players show it, by both backends: decord applies it itself; the PyAV path
rotates each frame by the first frame's display rotation (multiples of 90 degrees).

Sampling: frame k of the clip is the source frame shown at time start + k / fps, i.e. source
index floor((start + k / fps) * native_fps); so fps above the native rate repeats frames and
below it skips. Then each frame is resized (bilinear, antialiased) so it covers the target
size and center-cropped to it. A file that is missing, cannot be decoded or is too short for
the clip raises VideoError naming the file and the reason.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ForcelabError
from ..validate import in_range

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")
FPS_RANGE = (0.01, 1000.0)   # frame rates written (and sampled): one frame per 100 s to 1000 a second
FPS_DENOMINATOR = 100_000    # an mp4 time base finer than this is not kept by players
DEFAULT_FPS = 16.0   # Wan2.1's frame rate: videos written without one given, and read without one recorded


class VideoError(ForcelabError):
    """A video that cannot be used: missing, unreadable, corrupt or too short."""


@dataclass
class VideoInfo:
    frames: int         # decodable frames
    fps: float          # native frame rate
    height: int
    width: int

    @property
    def duration(self) -> float:
        return self.frames / self.fps


def default_backend() -> str:
    try:
        import decord  # noqa: F401
        return "decord"
    except ImportError:
        return "pyav"


# ---- backends: each gives (info, read(indices) -> uint8 [n, H, W, 3]) ----

@contextlib.contextmanager
def _native_stderr():
    """Collect what native code (ffmpeg inside decord) prints on file descriptor 2 meanwhile: its
    lines belong in forcelab's one-line error, not on the console before it."""
    sys.stderr.flush()
    saved = os.dup(2)
    lines: list[str] = []
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(line.strip() for line in sink.read().decode(errors="replace").splitlines() if line.strip())


def _open_decord(path: str):
    import decord

    with _native_stderr() as native:
        try:
            vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
            n = len(vr)
            fps = float(vr.get_avg_fps())
            first = vr[0].shape if n else (0, 0, 3)
            error = None
        except Exception as e:  # decord raises its own DECORDError and RuntimeError
            error = e
    if error is not None:
        said = f"; ffmpeg: {native[0]}" if native else ""
        raise VideoError(f"{path}: cannot decode with decord ({_first_line(error)}{said}); check the file "
                         f"(ffprobe) or re-encode it")
    if first[-1] != 3:
        # decord 0.6 mis-strides some small widths (16, 24, 48, 72 px...): its frames come back
        # with 4 or 6 "channels". PyAV decodes the same frames correctly.
        return _open_pyav(path)
    h, w = first[:2]

    def read(indices: list[int]) -> np.ndarray:
        try:
            return vr.get_batch(indices).asnumpy()
        except Exception as e:
            raise VideoError(f"{path}: decoding frames failed ({_first_line(e)}); the file is "
                             f"probably corrupt - re-encode it") from None

    return VideoInfo(n, fps, h, w), read


_RIGHT_ANGLE = 90


def _display_rotation(frame) -> int:
    """Counterclockwise degrees (0, 90, 180, 270) a decoded frame must be turned to stand upright."""
    angle = getattr(frame, "rotation", None)
    if angle is None:  # PyAV before VideoFrame.rotation: read the display matrix ourselves
        angle = 0.0
        for data in getattr(frame, "side_data", []) or []:
            if "DISPLAYMATRIX" in str(getattr(data, "type", "")).upper():
                m = np.frombuffer(bytes(data), dtype=np.int32)[:9].astype(float)
                # ffmpeg's av_display_rotation_get: minus the matrix's rotation angle
                angle = -math.degrees(math.atan2(m[1] / math.hypot(m[1], m[4]), m[0] / math.hypot(m[0], m[3])))
    return int(round(angle)) % 360


def _open_pyav(path: str):
    import av

    def open_stream():
        try:
            container = av.open(path)
            return container, container.streams.video[0]
        except (av.error.FFmpegError, IndexError, OSError) as e:
            raise VideoError(f"{path}: cannot open as a video ({_first_line(e) or 'no video stream'}); "
                             f"check the file (ffprobe) or re-encode it") from None

    def decode(last: float, keep: set[int]):
        """Decode frames 0..last in order; returns ({index: rgb frame} for `keep`, frames decoded)."""
        container, stream = open_stream()
        kept, n = {}, 0
        try:
            for frame in container.decode(stream):
                if n in keep:
                    kept[n] = frame.to_ndarray(format="rgb24")
                n += 1
                if n > last:
                    break
        except (av.error.FFmpegError, ValueError) as e:
            raise VideoError(f"{path}: decoding failed after {n} frames ({_first_line(e)}); "
                             f"the file is probably corrupt - re-encode it") from None
        finally:
            container.close()
        return kept, n

    container, stream = open_stream()
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 0.0
    h, w = stream.codec_context.height, stream.codec_context.width
    count = stream.frames  # from the container index; 0 when unknown (webm): count by decoding
    try:
        first = next(iter(container.decode(stream)), None)
    except (av.error.FFmpegError, ValueError):
        first = None  # reported by read() with the frame count
    finally:
        container.close()
    rotation = _display_rotation(first) if first is not None else 0
    if rotation % _RIGHT_ANGLE:
        raise VideoError(f"{path}: rotated by {rotation} degrees (not a multiple of 90); re-encode it upright")
    turns = rotation // _RIGHT_ANGLE
    if turns % 2:
        h, w = w, h
    if count <= 0:
        count = decode(math.inf, set())[1]

    def read(indices: list[int]) -> np.ndarray:
        kept, n = decode(max(indices), set(indices))
        if n <= max(indices):
            raise VideoError(f"{path}: too short - the container says {count} frames but only "
                             f"{n} decode; re-encode it")
        frames = np.stack([kept[i] for i in indices])
        return np.ascontiguousarray(np.rot90(frames, k=turns, axes=(1, 2))) if turns else frames

    return VideoInfo(count, fps, h, w), read


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _open(path: str | Path, backend: str | None):
    path = str(path)
    if not Path(path).is_file():
        raise VideoError(f"{path}: video file not found")
    if Path(path).stat().st_size == 0:
        raise VideoError(f"{path}: empty file (0 bytes); re-download or re-encode it")
    backend = backend or default_backend()
    if backend == "decord":
        return _open_decord(path)
    if backend == "pyav":
        return _open_pyav(path)
    raise ForcelabError(f"unknown video backend {backend!r}; choose decord or pyav")


def probe_video(path: str | Path, backend: str | None = None) -> VideoInfo:
    """Frame count, native fps and size of a video."""
    return _open(path, backend)[0]


def clip_indices(info: VideoInfo, fps: float | None, frames: int | None, start: float = 0.0,
                 path: str = "video") -> list[int]:
    """Source frame indices of a clip of `frames` frames at `fps` from `start` seconds."""
    if info.frames <= 0 or info.fps <= 0:
        raise VideoError(f"{path}: no decodable frames (fps {info.fps}); the file is probably corrupt")
    fps = fps or info.fps
    step = info.fps / fps
    first = start * info.fps
    available = int(math.floor((info.frames - first) / step - 1e-9)) + 1 if info.frames > first else 0
    if frames is None:
        frames = available
    if frames <= 0 or frames > available:
        last = start + (frames - 1) / fps if frames else start
        raise VideoError(f"{path}: too short - has {info.frames} frames ({info.duration:.2f} s at "
                         f"{info.fps:g} fps) but a clip of {frames} frames at {fps:g} fps from {start:g} s "
                         f"shows a frame at {last:.2f} s; lower --frames/--fps or drop the video")
    return [min(int(math.floor(first + k * step + 1e-6)), info.frames - 1) for k in range(frames)]


def resize_crop(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[F, 3, h, w] float -> [F, 3, H, W]: scale to cover (H, W) keeping the aspect, center-crop."""
    H, W = size
    h, w = video.shape[-2:]
    if (h, w) != (H, W):
        scale = max(H / h, W / w)
        nh, nw = max(H, round(h * scale)), max(W, round(w * scale))
        if (nh, nw) != (h, w):
            video = F.interpolate(video, size=(nh, nw), mode="bilinear", align_corners=False,
                                  antialias=scale < 1)
        top, left = (nh - H) // 2, (nw - W) // 2
        video = video[..., top:top + H, left:left + W]
    return video


def pick_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket (H, W) whose aspect ratio is closest to the video's (in log ratio)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ratio))


def read_video(path: str | Path, *, fps: float | None = None, frames: int | None = None,
               size: tuple[int, int] | list[tuple[int, int]] | None = None, start: float = 0.0,
               dtype: str = "uint8", backend: str | None = None) -> torch.Tensor:
    """A clip of `frames` frames at `fps` (native when None) from `start` seconds.

    size: (H, W), or a list of buckets to pick the closest aspect ratio from, or None (native).
    Returns [F, 3, H, W]: uint8 (dtype="uint8") or float32 in [-1, 1] (dtype="float").
    """
    info, read = _open(path, backend)
    indices = clip_indices(info, fps, frames, start, str(path))
    # decode each distinct frame once (fps above the native rate repeats frames)
    unique = sorted(set(indices))
    data = read(unique)
    pos = {idx: i for i, idx in enumerate(unique)}
    video = torch.from_numpy(data)[[pos[i] for i in indices]].permute(0, 3, 1, 2)  # [F, 3, h, w]
    if size is not None:
        if isinstance(size, list):
            size = pick_bucket(info.height, info.width, [tuple(b) for b in size])
        if tuple(size) != tuple(video.shape[-2:]):
            video = resize_crop(video.float(), tuple(size)).round_().clamp_(0, 255).to(torch.uint8)
    if dtype == "uint8":
        return video.contiguous()
    if dtype == "float":
        return video.float().div_(127.5).sub_(1.0)
    raise ForcelabError(f"read_video: dtype must be 'uint8' or 'float', got {dtype!r}")


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[F, 3, H, W] float in [-1, 1] (or uint8) -> uint8 [F, H, W, 3] numpy, ready for write_video."""
    if video.dtype != torch.uint8:
        video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def check_fps(value, name: str | None = "fps") -> float:
    """A frame rate in FPS_RANGE: far outside it a container either overflows or silently
    writes its default rate while the caller records another."""
    lo, hi = FPS_RANGE
    return float(in_range(value, name, lo, hi, why="frames per second a video container keeps"))


def write_video(path: str | Path, frames, fps: float, crf: int = 18, pix_fmt: str = "yuv420p",
                gop: int = 12, container_format: str | None = None) -> Path:
    """Write uint8 frames [F, H, W, 3] (numpy or torch) as H.264 mp4 (PyAV, libx264).

    A short GOP (gop=12 frames) keeps random access fast for decord; yuv420p (the default) plays
    everywhere and needs even H and W. crf: 0 = lossless luma, 18 = visually lossless, 23 = x264's
    default. The parent folder is created. container_format: "mp4" when the file name does not
    end in .mp4 (a temporary name of an atomic write).
    """
    import av

    frames = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ForcelabError(f"write_video {path}: frames must be uint8 [F, H, W, 3], got "
                            f"{frames.dtype} {list(frames.shape)}")
    check_fps(fps, f"write_video {path}: fps")
    n, h, w, _ = frames.shape
    if n == 0:
        raise ForcelabError(f"write_video {path}: no frames to write")
    if pix_fmt == "yuv420p" and (h % 2 or w % 2):
        raise ForcelabError(f"write_video {path}: yuv420p needs even sizes, got {h}x{w}; crop or pad a pixel")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format=container_format) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(FPS_DENOMINATOR))
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        stream.options = {"crf": str(crf), "g": str(gop), "threads": "1"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
