"""What the model can address and the machine can hold, checked before anything is loaded:
the RoPE table (tokens per row / column, latent frames without a window), the decoded video on
the host and the KV cache on the device; and where prompt switches may go."""

from __future__ import annotations

import torch

from ..errors import ForcelabError
from ..validate import fits_memory
from ..models.plans import Teacher

FLOAT32_BYTES = 4
RGB = 3
VIDEO_COPIES = 2            # the decoded chunks and their concatenation
KV = 2                      # keys and values


def check_size(config, ae, plan, batch: int, height: int, width: int, frames: int, latent: int,
               device: torch.device, dtype: torch.dtype) -> None:
    """Refuse sizes the model cannot address (RoPE table) or the device cannot hold, before
    loading anything: the decoded video (float32 on the host) and the KV cache (on the device)."""
    _, ph, pw = config.patch_size
    rows, cols = height // ae.spatial_stride // ph, width // ae.spatial_stride // pw
    if max(rows, cols) > config.rope_max_len:
        limit = config.rope_max_len * ph * ae.spatial_stride
        raise ForcelabError(f"--height/--width {height}x{width}: {max(rows, cols)} tokens per row/column, "
                            f"the model's RoPE table has {config.rope_max_len} (rope_max_len): at most "
                            f"{limit} pixels")
    teacher = isinstance(plan, Teacher)
    window = None if teacher else plan.window_frames  # the teacher sees the whole clip
    window = config.window_frames if window is None and not teacher else window
    if window in (None, 0) and latent > config.rope_max_len:
        raise ForcelabError(f"--frames {frames}: {latent} latent frames, more than the model's RoPE table "
                            f"({config.rope_max_len}, rope_max_len) without an attention window; lower "
                            f"--frames or stream with --window")
    video_bytes = VIDEO_COPIES * batch * RGB * frames * height * width * FLOAT32_BYTES
    fits_memory(video_bytes, torch.device("cpu"), f"--frames {frames} at {height}x{width} x --batch {batch}",
                "lower --frames, --height/--width or --batch")
    kept = min(latent, window) if window else latent
    tokens = kept * rows * cols
    itemsize = torch.empty((), dtype=dtype).element_size()
    cache_bytes = KV * config.num_layers * batch * tokens * config.dim * itemsize
    fits_memory(cache_bytes, device, f"the KV cache for {kept} latent frames at {height}x{width} x --batch {batch}",
                "lower --frames (or set --window), --height/--width or --batch")


def latent_switch_frame(frame: int, stride: int, unit: int, latent_frames: int) -> int:
    """Video frame -> latent frame; it must start a chunk (block) inside the video."""
    valid = [1 + (u - 1) * stride for u in range(unit, latent_frames, unit)]
    if frame not in valid:
        shown = 8
        listed = ", ".join(map(str, valid[:shown])) + (" ..." if len(valid) > shown else "")
        raise ForcelabError(f"--switch at frame {frame}: switches go at chunk boundaries inside the "
                            f"video ({latent_frames} latent frames): {listed or 'none - the video is one chunk'}")
    return 1 + (frame - 1) // stride
