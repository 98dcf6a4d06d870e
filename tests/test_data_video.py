"""Video decoding and writing (data/video.py)."""

import sys

import numpy as np
import pytest
import torch

from forcelab.data.video import FPS_RANGE, VideoError, clip_indices, pick_bucket, probe_video, read_video, resize_crop, \
    to_uint8_frames, write_video
from forcelab.errors import ForcelabError


def pattern(frames=20, h=32, w=64):
    """Smooth moving gradients (compress well, so decoded frames stay close to the source)."""
    yy, xx = np.mgrid[:h, :w]
    return np.stack([np.stack([(xx * 4 + t * 6) % 256, (yy * 6 + t * 3) % 256, (xx + yy) * 2 % 256], -1)
                     for t in range(frames)]).astype(np.uint8)


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("v") / "a.mp4", pattern(), fps=16)


def test_decord_and_pyav_decode_the_same_frames(mp4):
    pytest.importorskip("decord")
    for kwargs in [{}, dict(fps=8, frames=9), dict(fps=24, frames=25, start=0.2, size=(16, 16))]:
        a = read_video(mp4, backend="decord", **kwargs)
        b = read_video(mp4, backend="pyav", **kwargs)
        assert a.dtype == torch.uint8 and torch.equal(a, b), kwargs
    assert probe_video(mp4, "decord") == probe_video(mp4, "pyav")


def test_read_video_samples_resizes_and_normalises(mp4):
    src = torch.from_numpy(pattern()).permute(0, 3, 1, 2)
    video = read_video(mp4, backend="pyav")
    assert video.shape == (20, 3, 32, 64)
    assert (video.float() - src.float()).abs().mean() < 6  # h.264 at crf 18
    info = probe_video(mp4, "pyav")
    assert (info.frames, info.fps, info.height, info.width) == (20, 16.0, 32, 64)
    # 8 fps from a 16 fps file takes every other frame; 32 fps repeats each
    assert clip_indices(info, 8, 5) == [0, 2, 4, 6, 8]
    assert clip_indices(info, 32, 4, start=0.5) == [8, 8, 9, 9]
    half = read_video(mp4, fps=8, frames=5, backend="pyav")
    assert torch.equal(half, video[[0, 2, 4, 6, 8]])
    clip = read_video(mp4, frames=3, size=(16, 16), dtype="float", backend="pyav")
    assert clip.shape == (3, 3, 16, 16) and clip.dtype == torch.float32
    assert -1 <= clip.min() and clip.max() <= 1
    # a bucket list picks the closest aspect ratio (64x32 is 2:1 -> the wide bucket)
    assert read_video(mp4, frames=1, size=[(32, 32), (16, 32)], backend="pyav").shape[-2:] == (16, 32)
    assert pick_bucket(480, 600, [(480, 832), (624, 624), (832, 480)]) == (624, 624)


def test_resize_crop_keeps_the_center():
    video = torch.zeros(1, 3, 20, 40)
    video[..., :, 10:30] = 1.0  # the middle half of the width
    out = resize_crop(video, (10, 10))  # scale 0.5 -> 10x20, crop the middle 10 columns
    assert out.shape == (1, 3, 10, 10) and out[..., 1:-1].min() > 0.99 and out.min() > 0.8  # antialias blurs the edge


def test_bad_videos_raise_errors_naming_file_and_reason(tmp_path, mp4):
    with pytest.raises(VideoError, match="missing.mp4: video file not found"):
        read_video(tmp_path / "missing.mp4")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    for backend in ["pyav"] + (["decord"] if _has_decord() else []):
        with pytest.raises(VideoError, match="corrupt.mp4: cannot"):
            read_video(corrupt, backend=backend)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(mp4.read_bytes()[:2000])
    with pytest.raises(VideoError, match="truncated.mp4"):
        read_video(truncated, backend="pyav")
    with pytest.raises(VideoError, match=r"a.mp4: too short - has 20 frames .* 21 frames"):
        read_video(mp4, frames=21)
    with pytest.raises(VideoError, match="too short"):
        read_video(mp4, fps=4, frames=5, start=0.5)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="empty.mp4: empty file"):
        read_video(tmp_path / "empty.mp4")


def test_write_video_checks_its_input(tmp_path):
    with pytest.raises(ForcelabError, match="even sizes"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 31, 32, 3), np.uint8), fps=8)
    with pytest.raises(ForcelabError, match=r"uint8 \[F, H, W, 3\]"):
        write_video(tmp_path / "f.mp4", np.zeros((2, 32, 32, 3), np.float32), fps=8)
    frames = to_uint8_frames(torch.zeros(4, 3, 16, 16))  # float [-1, 1] -> uint8 [F, H, W, 3]
    path = write_video(tmp_path / "sub" / "gray.mp4", frames, fps=12.5)
    info = probe_video(path, "pyav")
    assert (info.frames, info.fps, info.height) == (4, 12.5, 16)


def _has_decord():
    try:
        import decord  # noqa: F401
        return True
    except ImportError:
        return False


def test_webm_and_mov_read_the_same_with_both_backends(tmp_path):
    import av

    frames = pattern(10, 32, 32)
    write_video(tmp_path / "a.mov", frames, fps=8)
    if "libvpx-vp9" not in av.codecs_available:
        pytest.skip("PyAV without libvpx-vp9")
    with av.open(str(tmp_path / "a.webm"), "w") as container:  # webm: no frame count in the container
        stream = container.add_stream("libvpx-vp9", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    for name in ["a.mov", "a.webm"]:
        video = read_video(tmp_path / name, fps=4, frames=5, backend="pyav")
        assert video.shape == (5, 3, 32, 32) and probe_video(tmp_path / name, "pyav").frames == 10
        if _has_decord():
            assert torch.equal(video, read_video(tmp_path / name, fps=4, frames=5, backend="decord"))


def _write_rotated(path, frames, rotation):
    """An mp4 whose display matrix says: turn the stored frames `rotation` degrees counterclockwise
    (what phones write for portrait videos)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "0"}
        if rotation:
            if not hasattr(stream, "set_display_rotation"):
                pytest.skip("PyAV without set_display_rotation")
            stream.set_display_rotation(rotation)
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotated_videos_decode_upright_and_identically_with_every_backend(tmp_path, rotation):
    frames = pattern(6, 32, 64)
    frames[:, :8, :8] = (255, 0, 0)                       # a red top-left corner marks "up"
    plain = read_video(_write_rotated(tmp_path / "plain.mp4", frames, 0), backend="pyav")
    path = _write_rotated(tmp_path / f"r{rotation}.mp4", frames, rotation)
    turns = rotation // 90
    # reference: the unrotated decode, turned counterclockwise by hand
    expected = torch.rot90(plain, k=turns, dims=(2, 3))
    backends = ["pyav"] + (["decord"] if _has_decord() else [])
    for backend in backends:
        video = read_video(path, backend=backend)
        assert torch.equal(video, expected), backend
        info = probe_video(path, backend)
        assert (info.height, info.width) == ((64, 32) if turns % 2 else (32, 64)), backend
    # the red corner lands where a player shows it: 90 -> bottom-left, 180 -> bottom-right, 270 -> top-right
    red = (expected[0, 0] > 200) & (expected[0, 2] < 60)
    rows, cols = torch.nonzero(red, as_tuple=True)
    h, w = expected.shape[-2:]
    corner = (rows.float().mean() > h / 2, cols.float().mean() > w / 2)
    assert corner == {1: (True, False), 2: (True, True), 3: (False, True)}[turns]
    # resize and crop happen after rotation (sizes are of the upright video)
    clip = read_video(path, backend="pyav", size=(16, 8) if turns % 2 else (8, 16))
    assert clip.shape[-2:] == ((16, 8) if turns % 2 else (8, 16))


@pytest.mark.parametrize("fps", [1e30, 1e-30, 0.0, -8.0, float("nan")])
def test_write_video_refuses_a_frame_rate_a_container_cannot_keep(tmp_path, fps):
    frames = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(ForcelabError, match="fps must be"):
        write_video(tmp_path / "a.mp4", frames, fps)
    assert not (tmp_path / "a.mp4").exists()


@pytest.mark.parametrize("fps", [FPS_RANGE[0], 16.0, FPS_RANGE[1]])
def test_write_video_keeps_every_rate_in_range(tmp_path, fps):
    import av

    frames = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    path = write_video(tmp_path / "a.mp4", frames, fps)
    with av.open(str(path)) as container:
        assert float(container.streams.video[0].average_rate) == pytest.approx(fps, rel=1e-3)


def test_a_corrupt_file_under_decord_is_one_error_and_nothing_on_the_console(tmp_path, capfd):
    pytest.importorskip("decord")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match=r"cannot decode with decord \(.*; ffmpeg: .*moov atom not found\)"):
        read_video(bad, backend="decord")
    out, err = capfd.readouterr()
    assert out == "" and err == ""          # ffmpeg's own lines are in the message, not printed before it
    print("after", file=sys.stderr)         # the console is restored
    assert capfd.readouterr().err == "after\n"
