"""Video autoencoders and text encoders (models/autoencoder.py, models/text_encoder.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from forcelab.errors import ForcelabError
from forcelab.models.autoencoder import (ToyCodec, VideoAutoencoder, WanVAE, dct_matrix, latent_frames, load_autoencoder,
                                         pixel_frames, save_tiny_wan_vae, toy_cell_basis)
from forcelab.models.config import DiTConfig
from forcelab.models.text_encoder import (TOY_VOCAB, TextEncoder, ToyTextEncoder, UMT5TextEncoder, load_text_encoder,
                                          save_tiny_umt5)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return save_tiny_wan_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory):
    return save_tiny_umt5(tmp_path_factory.mktemp("umt5"))


TOY_PSNR_DB = 25.0     # the default toy codec's reconstruction of toy-world frames (measured 25.8 dB)


@pytest.fixture(scope="module")
def toy_video():
    """Toy-world clips the codec's statistics were not measured on (world seed 1): [8, 3, 16, 32, 32]."""
    from forcelab.data.toyworld import ToyWorld

    world = ToyWorld(seed=1)
    return torch.stack([world.clip(i).video for i in range(8)]).float().div(127.5).sub(1.0).transpose(1, 2)


def test_toy_cell_basis_is_orthonormal_colour_times_dct():
    # the DCT-II against its closed form, in float64
    n = 4
    ref = torch.tensor([[math.cos(math.pi * (i + 0.5) * k / n) * math.sqrt((1 if k else 0.5) * 2 / n)
                         for i in range(n)] for k in range(n)], dtype=torch.float64)
    torch.testing.assert_close(dct_matrix(n), ref, rtol=0, atol=1e-12)
    basis = toy_cell_basis(4)                                     # [48, 48], rows in pixel_unshuffle order
    torch.testing.assert_close(basis @ basis.T, torch.eye(48, dtype=torch.float64), rtol=0, atol=1e-12)
    cells = basis.view(48, 3, 4, 4)
    # rows 0-2: constant over the cell (the mean colour), luma first; rows 3-4: luma gradients
    assert torch.allclose(cells[:3], cells[:3, :, :1, :1].expand(-1, -1, 4, 4))
    torch.testing.assert_close(cells[0], torch.full((3, 4, 4), 1 / math.sqrt(48), dtype=torch.float64))
    for row in (3, 4):
        assert torch.allclose(cells[row, 0], cells[row, 1]) and torch.allclose(cells[row, 0], cells[row, 2])
        assert torch.allclose(cells[row, 0].sum(), torch.zeros((), dtype=torch.float64), atol=1e-12)


def test_toy_codec_round_trips_on_its_subspace_and_fits_the_toy_dit():
    codec = load_autoencoder("toy")
    assert isinstance(codec, ToyCodec) and isinstance(codec, VideoAutoencoder)
    toy = DiTConfig.preset("toy")
    assert (codec.latent_channels, codec.spatial_stride, codec.temporal_stride) == (toy.in_channels, 4, 1)
    g = torch.Generator().manual_seed(0)
    video = torch.rand(2, 3, 5, 32, 32, generator=g) * 2 - 1
    z = codec.encode(video)
    assert z.shape == (2, toy.in_channels, 5, 8, 8)
    # decode . encode is the orthogonal projection onto the kept subspace: idempotent, and the
    # residual has no component in it (its code is the code of zero)
    proj = codec.decode(z)
    torch.testing.assert_close(codec.decode(codec.encode(proj)), proj, rtol=0, atol=1e-5)
    torch.testing.assert_close(codec.encode(video - proj), codec.encode(torch.zeros_like(video)), rtol=0, atol=1e-4)
    z_any = torch.randn(1, toy.in_channels, 3, 8, 8, generator=g)  # any latent: decode then encode gives it back
    torch.testing.assert_close(codec.encode(codec.decode(z_any)), z_any, rtol=0, atol=1e-4)
    # a video constant over each 4x4 cell lies in the subspace (the first 3 channels are the mean colour)
    blocky = F.interpolate(torch.rand(1, 3, 2, 8, 8, generator=g) * 2 - 1, scale_factor=(1, 4, 4))
    torch.testing.assert_close(load_autoencoder("toy:3").decode(load_autoencoder("toy:3").encode(blocky)), blocky,
                               rtol=0, atol=1e-5)
    # the full basis is exact on any video; streaming decode equals decode
    exact = load_autoencoder("toy:48")
    torch.testing.assert_close(exact.decode(exact.encode(video)), video, rtol=0, atol=1e-5)
    stream = codec.decode_stream()
    torch.testing.assert_close(torch.cat([stream.push(z[:, :, :2]), stream.push(z[:, :, 2:])], 2), proj, rtol=0, atol=0)
    two = load_autoencoder("toy:12:2")
    assert (two.latent_channels, two.spatial_stride, two.name) == (12, 2, "toy-dct-s2-c12")
    with pytest.raises(ForcelabError, match="multiples of 4"):
        codec.encode(torch.zeros(1, 3, 1, 30, 32))
    with pytest.raises(ForcelabError, match=r"expected a latent \[B, 6"):
        codec.decode(torch.zeros(1, 5, 1, 8, 8))


def test_toy_codec_reconstructs_toy_frames_and_normalises_their_latents(toy_video):
    codec = load_autoencoder("toy")
    z = codec.encode(toy_video)
    mse = (codec.decode(z).clamp(-1, 1) - toy_video).pow(2).mean().item()
    assert 10 * math.log10(4 / mse) > TOY_PSNR_DB               # pixel range 2 -> peak^2 = 4
    mean, std = z.mean((0, 2, 3, 4)), z.std((0, 2, 3, 4))      # per channel, on unseen clips
    assert mean.abs().max() < 0.15 and ((std > 0.8) & (std < 1.2)).all(), (mean, std)
    # more channels, better reconstruction: the basis is ordered coarse to fine
    errs = [(load_autoencoder(f"toy:{c}").decode(load_autoencoder(f"toy:{c}").encode(toy_video)) - toy_video)
            .pow(2).mean().item() for c in (3, 6, 12)]
    assert errs[0] > errs[1] > errs[2]


def test_wan_vae_normalises_and_streams(wan_dir):
    vae = load_autoencoder(str(wan_dir))
    assert isinstance(vae, WanVAE) and vae.name == f"wan-vae:{wan_dir.name}"
    assert (vae.latent_channels, vae.temporal_stride, vae.spatial_stride) == (16, 4, 8)
    assert latent_frames(vae, 9) == 3 and pixel_frames(vae, 3) == 9
    torch.manual_seed(0)
    video = torch.rand(1, 3, 9, 16, 24) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (1, 16, 3, 2, 3)
    mu = vae.vae.encode(video).latent_dist.mean
    mean = torch.tensor(vae.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(z, (mu - mean) / std)
    full = vae.decode(z)
    assert full.shape == video.shape and full.abs().max() <= 1
    stream = vae.decode_stream()
    parts = [stream.push(z[:, :, :1]), stream.push(z[:, :, 1:2]), stream.push(z[:, :, 2:])]
    assert [p.shape[2] for p in parts] == [1, 4, 4]
    torch.testing.assert_close(torch.cat(parts, 2), full, atol=1e-6, rtol=0)
    with pytest.raises(ForcelabError, match="4k\\+1"):
        vae.encode(torch.zeros(1, 3, 8, 16, 24))


def test_load_autoencoder_errors_name_the_path(tmp_path):
    with pytest.raises(ForcelabError, match=f"{tmp_path / 'nope'}.*AutoencoderKLWan"):
        load_autoencoder(str(tmp_path / "nope"))
    with pytest.raises(ForcelabError, match="toy:CHANNELS"):
        load_autoencoder("toy:x")
    with pytest.raises(ForcelabError, match="1 <= channels <= 3"):
        load_autoencoder("toy:49")


def test_toy_text_encoder_is_deterministic_and_zero_padded():
    a, b = ToyTextEncoder(), load_text_encoder("toy")
    assert isinstance(a, TextEncoder) and (a.dim, a.max_length) == (32, 16)
    prompts = ["a red ball and a blue ball moving quickly", "ball red a", "a zebra", ""]
    emb, lengths = a.encode(prompts)
    assert emb.shape == (4, 16, 32) and lengths.tolist() == [9, 3, 2, 0]
    assert torch.equal(emb, b.encode(prompts)[0])  # fresh instance: same tables, stable hashing
    for e, n in zip(emb, lengths):
        assert e[n:].abs().max() == 0 and (n == 0 or e[:n].abs().sum(-1).min() > 0)
    # word order matters (position term); unknown words land in the hashed rows
    assert not torch.equal(emb[1, :3], a.encode(["a red ball"])[0][0, :3])
    assert a.token_ids("a zebra")[1] >= len(TOY_VOCAB)
    assert a.token_ids("a zebra") == b.token_ids("A  Zebra!")
    assert ToyTextEncoder(seed=1).name != a.name
    long, n = a.encode([" ".join(["ball"] * 40)])
    assert n.item() == 16 and long.shape == (1, 16, 32)
    assert "a red ball" in a.cache.items or "ball red a" in a.cache.items


@pytest.mark.parametrize("spec, size", [("toy:64", (64, 16)), ("toy:4096:8", (4096, 8))])
def test_toy_text_encoder_sizes_from_the_spec(spec, size):
    te = load_text_encoder(spec)
    emb, lengths = te.encode(["a red ball"])
    assert (te.dim, te.max_length) == size and emb.shape == (1, size[1], size[0])
    assert lengths.tolist() == [3]


@pytest.mark.parametrize("spec", ["toy:", "toy:0", "toy:32:16:1", "toy:wide"])
def test_toy_text_encoder_bad_spec_names_the_forms(spec):
    with pytest.raises(ForcelabError, match="toy:DIM:LENGTH"):
        load_text_encoder(spec)


def test_umt5_text_encoder_from_a_local_directory(umt5_dir, tmp_path):
    te = load_text_encoder(str(umt5_dir), max_length=24)
    assert isinstance(te, UMT5TextEncoder) and te.dim == 32 and te.max_length == 24
    prompts = ["a red ball", "a zebra bouncing quickly over the fence"]
    emb, lengths = te.encode(prompts)
    ids = te.tokenizer(prompts[0]).input_ids
    assert ids[-1] == te.tokenizer.eos_token_id and lengths[0] == len(ids)
    assert emb.shape == (2, 24, 32)
    for e, n in zip(emb, lengths):
        assert e[n:].abs().max() == 0 and e[:n].abs().sum(-1).min() > 0
    te.cache.items.clear()
    alone, _ = te.encode([prompts[1]])  # no cache: batch composition does not change the result
    torch.testing.assert_close(alone[0], emb[1], atol=1e-5, rtol=0)
    assert load_text_encoder(str(umt5_dir)).max_length == 512  # Wan's padding by default
    with pytest.raises(ForcelabError, match="UMT5EncoderModel"):
        load_text_encoder(str(tmp_path / "missing"))


def test_pipeline_folder_layout(wan_dir, umt5_dir, tmp_path):
    """A Wan2.1 diffusers folder: vae/, text_encoder/, tokenizer/ subfolders."""
    import shutil

    shutil.copytree(wan_dir, tmp_path / "vae")
    shutil.copytree(umt5_dir, tmp_path / "text_encoder")
    shutil.copytree(umt5_dir, tmp_path / "tokenizer")
    assert load_autoencoder(str(tmp_path)).latent_channels == 16
    assert load_text_encoder(str(tmp_path), max_length=8).encode(["a ball"])[0].shape == (1, 8, 32)
