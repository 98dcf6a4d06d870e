"""Video autoencoders and text encoders (models/autoencoder.py, models/text_encoder.py)."""

import pytest
import torch

from forcelab.errors import ForcelabError
from forcelab.models.autoencoder import (ToyPixelCodec, VideoAutoencoder, WanVAE, latent_frames, load_autoencoder,
                                         pixel_frames, save_tiny_wan_vae)
from forcelab.models.config import DiTConfig
from forcelab.models.text_encoder import (TOY_VOCAB, TextEncoder, ToyTextEncoder, UMT5TextEncoder, load_text_encoder,
                                          save_tiny_umt5)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return save_tiny_wan_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory):
    return save_tiny_umt5(tmp_path_factory.mktemp("umt5"))


def test_toy_codec_is_exact_and_fits_the_toy_dit():
    codec = load_autoencoder("toy")
    assert isinstance(codec, ToyPixelCodec) and isinstance(codec, VideoAutoencoder)
    toy = DiTConfig.preset("toy")
    video = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    z = codec.encode(video)
    assert z.shape == (2, toy.in_channels, 5, 8, 8)
    assert torch.equal(codec.decode(z), video)
    # channel c*16 + dy*4 + dx holds pixel (4y+dy, 4x+dx) of color c
    assert z[1, 2 * 16 + 1 * 4 + 3, 4, 5, 6] == video[1, 2, 4, 5 * 4 + 1, 6 * 4 + 3]
    stream = codec.decode_stream()
    assert torch.equal(torch.cat([stream.push(z[:, :, :2]), stream.push(z[:, :, 2:])], 2), video)
    assert load_autoencoder("toy:2").latent_channels == 12
    with pytest.raises(ForcelabError, match="multiples of 4"):
        codec.encode(torch.zeros(1, 3, 1, 30, 32))


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
    with pytest.raises(ForcelabError, match="toy:FACTOR"):
        load_autoencoder("toy:x")


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
