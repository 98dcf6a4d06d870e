"""`forcelab generate --image / --video`: the given frames are committed to the cache as the
rollout's prefix and the video continues them (compared with rollout(..., prefix=...) run
directly), the output starts with them, and bad input is a one-line error."""

import json

import numpy as np
import pytest
import torch

import forcelab.data.video as video_io
from forcelab.cli import main
from forcelab.data.toyworld import ToyWorld
from forcelab.models import CausalDiT, DiTConfig
from forcelab.models.autoencoder import load_autoencoder
from forcelab.models.plans import Chunkwise, default_timesteps
from forcelab.models.rollout import Noise, rollout
from forcelab.models.text_encoder import load_text_encoder

PROMPT = "a red ball and a blue ball"
CODEC = load_autoencoder("toy")        # latent channels and grid come from the codec (time stride 1)
K = DiTConfig.preset("toy").chunk_frames                        # latent (= video) frames per chunk
CELL = CODEC.spatial_stride * max(DiTConfig.preset("toy").patch_size[1:])


@pytest.fixture
def ckpt(toy_dit):
    return toy_dit                   # a one-layer toy DiT (tests/conftest.py)


@pytest.fixture(scope="module")
def clip():
    return ToyWorld().clip(seed=3, frames=2 * K).video      # uint8 [2K, 3, 32, 32]


@pytest.fixture(scope="module")
def image(clip, tmp_path_factory):
    PIL = pytest.importorskip("PIL.Image")
    path = tmp_path_factory.mktemp("img") / "first.png"
    PIL.fromarray(clip[0].permute(1, 2, 0).numpy()).save(path)
    return path


@pytest.fixture
def written(monkeypatch):
    """The uint8 frames [F, H, W, 3] handed to the mp4 writer, in order."""
    out, real = [], video_io.write_video

    def capture(path, frames, fps, *a, **kw):
        out.append(np.array(frames))
        return real(path, frames, fps, *a, **kw)
    monkeypatch.setattr(video_io, "write_video", capture)
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def generate(ckpt, out, *extra):
    return main(["generate", str(ckpt), "--vae", "toy", "--text-encoder", "toy", "--output", str(out),
                 "--quiet", "--prompt", PROMPT, *map(str, extra)])


def direct(ckpt, prefix, new_frames, seed=0):
    """The same generation through the engine directly: rollout(..., prefix=...), decoded."""
    model = CausalDiT.from_pretrained(ckpt)
    ctx = load_text_encoder("toy").encode([PROMPT])[0]
    plan = Chunkwise(timesteps=default_timesteps(4, 5.0))
    noise = Noise([seed], CODEC.latent_channels, 32 // CODEC.spatial_stride, 32 // CODEC.spatial_stride)
    with torch.no_grad():
        x = rollout(model, plan, ctx, noise, new_frames, prefix=prefix).x0
        pixels = CODEC.decode(torch.cat([prefix, x], 2) if prefix is not None else x)
    return video_io.to_uint8_frames(pixels[0].transpose(0, 1))


def test_image_prefix_equals_a_direct_rollout(ckpt, image, clip, tmp_path, written):
    assert generate(ckpt, tmp_path, "--image", image, "--frames", 3 * K) == 0
    frames = written[-1]
    assert frames.shape == (3 * K, 32, 32, 3)                   # one chunk held + two generated
    given = clip[0].permute(1, 2, 0).numpy()
    assert all(psnr(frames[j], given) > 20 for j in range(K))       # the (lossy) codec's view of the image
    still = clip[:1].float().div(127.5).sub(1).expand(K, -1, -1, -1).permute(1, 0, 2, 3)[None]
    assert np.array_equal(frames, direct(ckpt, CODEC.encode(still), 2 * K))
    assert not np.array_equal(frames[K:], direct(ckpt, None, 2 * K))   # the prefix conditions the rest
    side = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert side["conditioning"] == {"kind": "image", "path": str(image), "input_size": [32, 32],
                                    "prefix_frames": K, "held_still": True, "prefix_latent_frames": K}
    assert side["frames"] == 3 * K


def test_video_prefix_equals_a_direct_rollout(ckpt, clip, tmp_path, written):
    src = tmp_path / "clip.mp4"
    video_io.write_video(src, clip.permute(0, 2, 3, 1).numpy(), 8.0)
    out = tmp_path / "out"
    assert generate(ckpt, out, "--video", src, "--prefix-frames", 2 * K, "--frames", 3 * K, "--seed", 5) == 0
    frames = written[-1]
    given = video_io.read_video(src, frames=2 * K, dtype="float", backend="pyav")     # [2K, 3, 32, 32]
    prefix = CODEC.encode(given.permute(1, 0, 2, 3)[None])
    assert frames.shape == (3 * K, 32, 32, 3)
    assert all(psnr(a, b) > 20 for a, b in zip(frames[:2 * K], video_io.to_uint8_frames(given)))
    assert np.array_equal(frames, direct(ckpt, prefix, K, seed=5))
    side = json.loads(next(out.glob("*.json")).read_text())
    assert side["conditioning"]["kind"] == "video" and side["conditioning"]["prefix_latent_frames"] == 2 * K


def test_a_larger_input_is_scaled_and_cropped(ckpt, tmp_path, written):
    PIL = pytest.importorskip("PIL.Image")
    big = tmp_path / "big.png"
    PIL.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(big)
    assert generate(ckpt, tmp_path / "o", "--image", big, "--height", 32, "--width", 32, "--frames", 2 * K) == 0
    frames = written[-1]
    assert frames.shape == (2 * K, 32, 32, 3) and (frames[0] == 200).all()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    PIL = pytest.importorskip("PIL.Image")
    d = tmp_path_factory.mktemp("bad")
    PIL.fromarray(np.zeros((21, 27, 3), np.uint8)).save(d / "odd.png")
    (d / "notes.txt").write_text("not an image")
    return d


@pytest.mark.parametrize("args,message", [
    (["--image", "{d}/missing.png"], "--image {d}/missing.png: file not found"),
    (["--image", "{d}/odd.png"], f"size 21x27 is not a multiple of {CELL}"),
    (["--image", "{d}/notes.txt"], "--image {d}/notes.txt: cannot read it"),
    (["--image", "{d}/odd.png", "--plan", "teacher"], "need a causal plan"),
    (["--image", "{d}/odd.png", "--video", "{d}/odd.png"], "not both"),
    (["--prefix-frames", "2"], "goes with --video"),
    (["--video", "{d}/odd.png", "--prefix-frames", str(K + 1), "--height", "32", "--width", "32"],
     f"whole chunks of {K}"),
    (["--image", "{d}/odd.png", "--frames", str(K), "--height", "32", "--width", "32"], "ask for more"),
])
def test_bad_input_is_one_line_before_the_model_loads(ckpt, bad_files, tmp_path, monkeypatch, capsys,
                                                      args, message):
    def no_work(*a, **k):
        raise AssertionError("the DiT was loaded before the input was checked")
    monkeypatch.setattr(CausalDiT, "from_pretrained", no_work)
    args = [a.format(d=bad_files) for a in args]
    assert generate(ckpt, tmp_path, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.format(d=bad_files) in err[0], err
    assert not list(tmp_path.glob("*.mp4"))


def test_image_with_a_temporally_compressing_vae(tmp_path, written):
    """Wan VAE (stride 4): the image is held for one chunk = 5 pixel frames -> 2 latent frames."""
    pytest.importorskip("diffusers")
    PIL = pytest.importorskip("PIL.Image")
    from forcelab.models.autoencoder import load_autoencoder, save_tiny_wan_vae

    vae_dir = save_tiny_wan_vae(tmp_path / "vae")
    z = load_autoencoder(str(vae_dir)).latent_channels
    dit = tmp_path / "dit"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CausalDiT(DiTConfig.preset("toy", in_channels=z, out_channels=z, num_layers=1)).save_pretrained(dit)
    img = tmp_path / "first.png"
    rgb = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    PIL.fromarray(rgb).save(img)
    assert main(["generate", str(dit), "--vae", str(vae_dir), "--text-encoder", "toy", "--output",
                 str(tmp_path / "o"), "--quiet", "--prompt", PROMPT, "--image", str(img), "--frames", "13"]) == 0
    frames = written[-1]
    assert frames.shape == (13, 32, 48, 3)                      # 5 held + 8 generated
    ae = load_autoencoder(str(vae_dir))
    still = torch.from_numpy(rgb).permute(2, 0, 1).float().div(127.5).sub(1)[None, :, None].expand(-1, -1, 5, -1, -1)
    prefix = ae.encode(still)
    assert prefix.shape[2] == 2
    model = CausalDiT.from_pretrained(dit)
    ctx = load_text_encoder("toy").encode([PROMPT])[0]
    with torch.no_grad():
        s = ae.spatial_stride
        x = rollout(model, Chunkwise(timesteps=default_timesteps(4, 5.0)), ctx,
                    Noise([0], ae.latent_channels, 32 // s, 48 // s), 2,
                    prefix=prefix).x0
        ref = video_io.to_uint8_frames(ae.decode(torch.cat([prefix, x], 2))[0].transpose(0, 1))
    assert np.abs(frames.astype(int) - ref.astype(int)).max() <= 1
    side = json.loads(next((tmp_path / "o").glob("*.json")).read_text())
    assert side["conditioning"]["prefix_frames"] == 5 and side["conditioning"]["prefix_latent_frames"] == 2
