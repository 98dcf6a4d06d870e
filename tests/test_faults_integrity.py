"""Fault injection: integrity end to end - shards, ODE pairs, DiT weights, encoder folders.

A byte changed inside a stored sample (same file size, so the default open-time size check
passes) is caught when that sample is read, naming the shard and the sample key, and then
stops the read or is skipped and recorded, as the reader chose. ODE-pair shards are held to
their records. Weights with NaN or inf values are refused at load, naming the tensor and its
file. The VAE and text-encoder loaders accept safetensors folders only, by forcelab's check.
"""

import json
import shutil
import tarfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from forcelab.cli import main
from forcelab.data import shards as shards_mod
from forcelab.data.ode_pairs import ODEPairs, ode_pair_dataset, write_ode_pairs
from forcelab.data.schema import DataError, encode_sample
from forcelab.data.shards import ShardDataset, write_record, write_shard
from forcelab.errors import CheckpointError, ForcelabError
from forcelab.models import CausalDiT

KEYS = [f"{i:09d}" for i in range(4)]


def latent_sample(i):
    g = torch.Generator().manual_seed(i)
    return encode_sample(f"{i:09d}", latent=torch.randn(4, 2, 2, 2, generator=g), text_emb=torch.randn(3, 5, generator=g),
                         text_len=3, meta={"caption": f"caption {i}", "source": f"v{i}.mp4"})


@pytest.fixture
def latents(tmp_path):
    """One shard of 4 latent samples with its record, as preprocess writes them."""
    samples = [latent_sample(i) for i in range(4)]
    tar = tmp_path / "shard-000000.tar"
    write_shard(tar, samples)
    write_record(tar, samples)
    return tar


def member(tar, name) -> tarfile.TarInfo:
    with tarfile.open(tar) as t:
        return t.getmember(name)


def damage(tar, name, how="flip"):
    """Change the last bytes of member `name`'s data in place (the file keeps its size): a flipped
    byte, or a bf16 NaN (0x7fc0) over the last stored element."""
    info = member(tar, name)
    data = bytearray(tar.read_bytes())
    end = info.offset_data + info.size
    if how == "flip":
        data[end - 1] ^= 0x01
    else:
        data[end - 2:end] = b"\xc0\x7f"
    tar.write_bytes(bytes(data))


def read_keys(source, **kwargs):
    return [s["key"] for s in ShardDataset(source, shuffle=0, **kwargs)]


# ---------------------------------------------------------------------- shards
@pytest.mark.parametrize("how", ["flip", "nan"])
def test_a_changed_byte_in_a_latent_stops_the_read_naming_shard_and_sample(latents, how):
    damage(latents, "000000002.latent.safetensors", how)
    ds = ShardDataset(latents.parent, shuffle=0)          # the default open-time check (size) passes
    it = iter(ds)
    assert [next(it)["key"] for _ in range(2)] == KEYS[:2]  # caught when ITS sample is read
    with pytest.raises(DataError) as e:
        next(it)
    msg = str(e.value)
    assert "shard-000000.tar, sample 000000002: checksum differs from the shard's record" in msg
    assert "on_damage='skip'" in msg and "\n" not in msg


def test_skip_leaves_the_damaged_sample_out_and_records_it(latents, capsys):
    damage(latents, "000000001.latent.safetensors")
    ds = ShardDataset(latents.parent, shuffle=0, on_damage="skip")
    assert read_keys(latents.parent, on_damage="skip") == [KEYS[0], *KEYS[2:]]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped damaged sample" in err[0] and "shard-000000.tar, sample 000000001" in err[0]
    assert [s["key"] for s in ds] == [KEYS[0], *KEYS[2:]]
    assert [(d["key"], d["shard"].endswith("shard-000000.tar")) for d in ds.damaged] == [(KEYS[1], True)]


def test_resampled_streams_check_samples_too(latents):
    damage(latents, "000000003.json")
    ds = ShardDataset(latents, resampled=True, samples_per_epoch=8, shuffle=0)
    with pytest.raises(DataError, match="sample 000000003: checksum differs"):
        list(ds)


def test_the_default_open_check_reads_no_shard(latents, monkeypatch):
    """verify="size" stays one stat per shard; per-sample checks hash bytes already read."""
    def no_hashing(path):
        raise AssertionError("the size check hashed a whole file")
    monkeypatch.setattr(shards_mod, "file_sha256", no_hashing)
    assert read_keys(latents) == KEYS


def test_a_record_without_sample_checksums_still_reads_and_the_decoder_catches_nan(latents, capsys):
    """An older record (no per-sample sha256): a NaN is still refused by the decoder, by name."""
    record = latents.with_suffix(".json")
    data = json.loads(record.read_text())
    del data["sample_sha256"]
    record.write_text(json.dumps(data))
    assert read_keys(latents) == KEYS
    damage(latents, "000000001.latent.safetensors", "nan")
    with pytest.raises(DataError, match=r"shard-000000.tar, sample 000000001: key 'latent.safetensors' tensor "
                                        r"'latent' holds NaN or inf"):
        read_keys(latents)
    assert read_keys(latents, on_damage="skip") == [KEYS[0], *KEYS[2:]]
    assert "sample 000000001" in capsys.readouterr().err


def test_bad_on_damage_value(latents):
    with pytest.raises(DataError, match=r"on_damage must be one of \('stop', 'skip'\)"):
        ShardDataset(latents, on_damage="ignore")


# ---------------------------------------------------------------------- ODE pairs
def pairs(n=4):
    g = torch.Generator().manual_seed(0)
    return [{"ode_latents": torch.randn(3, 4, 2, 2, 2, generator=g), "ode_timesteps": [1000.0, 500.0, 0.0],
             "text_emb": torch.randn(3, 5, generator=g), "text_len": 3, "caption": f"pair {i}"} for i in range(n)]


@pytest.fixture
def ode(tmp_path):
    write_ode_pairs(tmp_path / "ode", pairs(), shard_size=4)
    return tmp_path / "ode"


def cut_after(tar, key, pad=True):
    """Keep the members up to and including `key`'s last one (a tar cut at a member boundary)."""
    with tarfile.open(tar) as t:
        last = [m for m in t.getmembers() if m.name.startswith(key)][-1]
    end = last.offset_data + (last.size + 511) // 512 * 512
    tar.write_bytes(tar.read_bytes()[:end] + (b"\0" * 1024 if pad else b""))


@pytest.mark.parametrize("pad", [True, False], ids=["end-marker-added", "plain-cut"])
def test_a_truncated_ode_shard_is_an_error_naming_it(ode, pad):
    tar = ode / "ode-000000000.tar"
    assert len(ODEPairs(ode)) == 4
    cut_after(tar, KEYS[2], pad)                        # 3 of 4 pairs left
    for open_pairs in (ODEPairs, lambda src: list(ode_pair_dataset(src, shuffle=0))):
        with pytest.raises(DataError) as e:
            open_pairs(ode)
        assert "ode-000000000.tar" in str(e.value) and "\n" not in str(e.value)


def test_a_truncated_ode_shard_without_its_record_is_caught_by_the_manifest_count(ode):
    (ode / "ode-000000000.json").unlink()
    cut_after(ode / "ode-000000000.tar", KEYS[2])
    with pytest.raises(DataError, match=r"ode-000000000.tar: 3 pairs, its record says 4"):
        ODEPairs(ode)


def test_a_changed_byte_in_an_ode_pair_is_caught_when_that_pair_is_read(ode):
    damage(ode / "ode-000000000.tar", "000000001.ode.safetensors")
    ds = ODEPairs(ode)
    assert ds[0]["ode_latents"].shape == (3, 4, 2, 2, 2) and ds[2]["caption"] == "pair 2"
    with pytest.raises(DataError, match=r"ode-000000000.tar, pair 000000001: checksum differs"):
        ds[1]


# ---------------------------------------------------------------------- DiT weights
@pytest.fixture
def dit(toy_dit):
    return toy_dit                   # a one-layer toy DiT (tests/conftest.py)


def edited(dit, tmp_path, change):
    """A copy of the checkpoint with one weight replaced by change(weight); returns (path, key)."""
    path = tmp_path / "edited"
    shutil.copytree(dit, path)
    file = path / "diffusion_pytorch_model.safetensors"
    weights = load_file(file)
    key = sorted(k for k in weights if k.endswith("weight"))[0]
    weights[key] = change(weights[key])
    save_file(weights, str(file), metadata={"format": "pt"})
    return path, key


def poisoned(dit, tmp_path, value):
    """A copy of the checkpoint with one weight's first element set to `value`; returns (path, key)."""
    def poison(weight):
        weight.view(-1)[0] = value
        return weight
    return edited(dit, tmp_path, poison)


@pytest.mark.parametrize("value,dtype", [(float("nan"), None), (float("inf"), None), (1e6, torch.float16)],
                         ids=["nan", "inf", "overflows-fp16"])
def test_non_finite_weights_are_refused_at_load_naming_the_tensor(dit, tmp_path, value, dtype):
    path, key = poisoned(dit, tmp_path, value)
    with pytest.raises(CheckpointError) as e:
        CausalDiT.from_pretrained(path, dtype=dtype)
    msg = str(e.value)
    assert f"weight {key!r} holds NaN or inf" in msg and "diffusion_pytorch_model.safetensors" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_integer_weights_are_refused_at_load_naming_the_tensor(dit, tmp_path, dtype):
    path, key = edited(dit, tmp_path, lambda weight: weight.to(dtype))
    with pytest.raises(CheckpointError, match=f"weight {key!r} is stored as {dtype}; DiT weights are floating point"):
        CausalDiT.from_pretrained(path)


def test_generate_with_nan_weights_exits_2_and_writes_nothing(dit, tmp_path, capsys):
    path, key = poisoned(dit, tmp_path, float("nan"))
    out = tmp_path / "video.mp4"
    rc = main(["generate", str(path), "--vae", "toy", "--text-encoder", "toy", "--output", str(out), "--quiet",
               "--prompt", "a red ball"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and key in err[0] and not out.exists()


# ---------------------------------------------------------------------- encoder folders
def pickle_only(src, dst, weights_name):
    """A copy of a saved model folder whose weights are a pickle (.bin) instead of safetensors."""
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        torch.save(load_file(f), dst / weights_name)
        f.unlink()
    return dst


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory):
    from forcelab.models.autoencoder import save_tiny_wan_vae
    from forcelab.models.text_encoder import save_tiny_umt5

    root = tmp_path_factory.mktemp("enc")
    return {"vae": save_tiny_wan_vae(root / "vae"), "umt5": save_tiny_umt5(root / "umt5")}


@pytest.mark.parametrize("kind", ["vae", "umt5"])
def test_encoder_folders_with_pickle_weights_only_are_refused_by_forcelab(encoder_dirs, tmp_path, monkeypatch, kind):
    from diffusers import AutoencoderKLWan
    from transformers import UMT5EncoderModel

    from forcelab.models.autoencoder import load_autoencoder
    from forcelab.models.text_encoder import load_text_encoder

    load, cls, weights_name = {"vae": (load_autoencoder, AutoencoderKLWan, "diffusion_pytorch_model.bin"),
                               "umt5": (load_text_encoder, UMT5EncoderModel, "pytorch_model.bin")}[kind]
    calls = []
    real = cls.from_pretrained.__func__

    def recording(klass, *args, **kwargs):                # records the options, then loads for real
        calls.append(kwargs)
        return real(klass, *args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))
    folder = pickle_only(encoder_dirs[kind], tmp_path / kind, weights_name)
    with pytest.raises(ForcelabError) as e:
        load(str(folder))
    msg = str(e.value)
    assert f"{folder}: holds pickle weights only ({weights_name})" in msg and "safetensors only" in msg
    assert calls == []                                    # refused before the library is asked
    load(str(encoder_dirs[kind]))                         # the safetensors folder loads, asking for safetensors
    assert len(calls) == 1 and calls[0].get("use_safetensors") is True


# ---------------------------------------------------------------------- preprocess: what is not written
def test_an_encoding_with_nan_is_recorded_not_written(tmp_path, monkeypatch, capsys):
    from forcelab.data import preprocess
    from forcelab.data.toyworld import ToyWorld
    from forcelab.data.video import write_video

    folder = tmp_path / "vids"
    folder.mkdir()
    for i in range(2):
        write_video(folder / f"v{i}.mp4", ToyWorld().clip(i, frames=12).video.permute(0, 2, 3, 1), fps=8)
        (folder / f"v{i}.txt").write_text("a red ball")
    real = preprocess.encode_batch

    def nan_for_the_second(vae, videos):                  # the real encoder, then a NaN in video 1's latent
        z = real(vae, videos)
        z[1, 0, 0, 0, 0] = float("nan")
        return z

    monkeypatch.setattr(preprocess, "encode_batch", nan_for_the_second)
    argv = ["preprocess", "--quiet", "--videos", str(folder), "--vae", "toy", "--text-encoder", "toy", "--size",
            "32x32", "--frames", "9", "--fps", "8", "--batch-size", "2"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 0
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["counts"]["written"] == 1 and m["skipped"][0]["source"].endswith("v1.mp4")
    assert "the video encoder gave NaN or inf values" in m["skipped"][0]["reason"]
    assert [s["key"] for s in ShardDataset(tmp_path / "o", shuffle=0)] == ["000000000"]
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "strict"), "--strict"]) == 2
    assert "v1.mp4: the video encoder gave NaN" in capsys.readouterr().err


def test_a_prompt_file_row_that_is_not_one_text_is_named(tmp_path):
    from forcelab.data.prompts import PromptDataset

    (tmp_path / "p.jsonl").write_text('{"prompt": "a red ball"}\n{"prompt": ""}\n{"prompt": ["a", "b"]}\n')
    with pytest.raises(DataError, match=r"p.jsonl:3: the caption is a list of 2"):
        PromptDataset(tmp_path / "p.jsonl")
    (tmp_path / "ok.jsonl").write_text('{"prompt": "a red ball"}\n{"prompt": ""}\n')
    assert PromptDataset(tmp_path / "ok.jsonl").prompts == ["a red ball"]   # a blank row is passed over


def test_the_training_config_chooses_what_a_damaged_sample_does(latents):
    """data.on_damage reaches the shard stream a training run reads."""
    from forcelab.train.config import load_train_config
    from forcelab.train.data import ShardStream

    damage(latents, "000000001.latent.safetensors")
    cfg = load_train_config([], [f"data.source={latents.parent}", "data.on_damage=skip"])
    stream = ShardStream(latents.parent, ("latent",), cfg.seed, 0, 0, 1, cfg.data.on_damage)
    assert [k for s in stream.dataset for k in [s["key"]]] == [KEYS[0], *KEYS[2:]]
    with pytest.raises(Exception, match="data.on_damage"):
        load_train_config([], ["data.on_damage=ignore"])


def test_a_damaged_sample_read_by_a_dataloader_worker_is_still_one_line(latents):
    """With num_workers > 0 torch re-raises a worker's error with the worker's traceback inside
    the message; the training stream gives the user the worker's one line."""
    from forcelab.data.schema import DataError
    from forcelab.train.data import ShardStream

    damage(latents, "000000000.latent.safetensors")
    stream = ShardStream(latents.parent, ("latent",), 0, 0, 1, 1)
    with pytest.raises(DataError) as e:
        stream.batch([0])
    msg = str(e.value)
    assert "\n" not in msg and "shard-000000.tar, sample 000000000" in msg and "Traceback" not in msg
