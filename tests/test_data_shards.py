"""Shard reading: schema validation, shuffling, epochs, workers, collate, ODE pairs, prompts."""

import json

import pytest
import torch

from forcelab.data.ode_pairs import ode_pair_dataset, write_ode_pairs
from forcelab.data.prompts import PromptDataset
from forcelab.data.schema import DataError, collate, encode_sample
from forcelab.data.shards import ShardDataset, shard_loader, shard_urls, write_shard


def tensors(i, text_len=3, shape=(4, 2, 2, 2)):
    g = torch.Generator().manual_seed(i)
    text = torch.zeros(8, 5)
    text[:text_len] = torch.randn(text_len, 5, generator=g)
    return torch.randn(*shape, generator=g), text


def sample(i, text_len=3, **kw):
    latent, text = tensors(i, text_len)
    return encode_sample(f"{i:09d}", latent=latent, text_emb=text, text_len=text_len,
                         meta={"caption": f"caption {i}", "source": f"v{i}.mp4"}, **kw)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """6 shards of 4 samples: keys 0..23."""
    folder = tmp_path_factory.mktemp("shards")
    for k in range(6):
        write_shard(folder / f"shard-{k:06d}.tar", [sample(4 * k + j, text_len=1 + j) for j in range(4)])
    return folder


def keys(ds_or_loader):
    out = []
    for item in ds_or_loader:
        out += item["key"] if isinstance(item["key"], list) else [item["key"]]
    return out


def test_roundtrip_and_collate(shards):
    s = next(iter(ShardDataset(shards / "shard-000000.tar", shuffle=0)))
    assert s["key"] == "000000000" and s["caption"] == "caption 0" and s["text_len"] == 1
    assert s["latent"].dtype == torch.float32 and s["latent"].shape == (4, 2, 2, 2)
    assert s["text_emb"].shape == (8, 5) and s["text_emb"][1:].abs().max() == 0
    latent, text = tensors(0, text_len=1)
    assert torch.equal(s["latent"], latent.to(torch.bfloat16).float())
    assert torch.equal(s["text_emb"], text.to(torch.bfloat16).float())
    fp16 = ShardDataset(shards, shuffle=0, dtype=torch.float16)
    assert next(iter(fp16))["latent"].dtype == torch.float16
    batch = next(iter(shard_loader(ShardDataset(shards, shuffle=0), batch_size=4)))
    assert batch["latent"].shape == (4, 4, 2, 2, 2) and batch["text_len"].tolist() == [1, 2, 3, 4]
    assert batch["caption"] == [f"caption {i}" for i in range(4)] and len(batch["meta"]) == 4
    # text of different lengths L is zero-padded to the longest
    short = {"text_emb": torch.ones(2, 5), "text_len": 2, "latent": torch.zeros(1)}
    long = {"text_emb": torch.ones(6, 5), "text_len": 6, "latent": torch.zeros(1)}
    out = collate([short, long])
    assert out["text_emb"].shape == (2, 6, 5) and out["text_emb"][0, 2:].abs().max() == 0
    with pytest.raises(DataError, match="latents of different shapes"):
        collate([dict(short, latent=torch.zeros(2)), long])


def test_shuffle_epochs_and_workers_cover_every_sample_once(shards):
    everything = [f"{i:09d}" for i in range(24)]
    ds = ShardDataset(shards, shuffle=8, seed=3)
    first = keys(ds)
    assert sorted(first) == everything and first != everything
    assert keys(ds) == first  # same seed and epoch: same order
    ds.set_epoch(1)
    assert keys(ds) != first and sorted(keys(ds)) == everything
    for workers in (0, 2):
        loader = shard_loader(ShardDataset(shards, shuffle=8), batch_size=3, num_workers=workers)
        assert sorted(keys(loader)) == everything


def test_resampled_mode_is_infinite_with_fixed_epochs(shards):
    ds = ShardDataset(shards, resampled=True, samples_per_epoch=50, shuffle=8)
    first = keys(ds)
    assert len(first) == 50 and set(first) <= {f"{i:09d}" for i in range(24)} and len(ds) == 50
    loader = shard_loader(ds, batch_size=5, num_workers=2)
    assert len(keys(loader)) == 50
    ds.set_epoch(1)
    assert keys(ds) != first
    with pytest.raises(DataError, match="samples_per_epoch"):
        ShardDataset(shards, resampled=True)


def test_schema_errors_name_shard_and_key(tmp_path):
    bad = sample(0)
    bad["latent.safetensors"] = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}....."
    write_shard(tmp_path / "bad.tar", [bad])
    with pytest.raises(DataError, match=r"bad.tar, sample 000000000: key 'latent.safetensors' is not valid"):
        list(ShardDataset(tmp_path / "bad.tar", shuffle=0))
    missing = {k: v for k, v in sample(1).items() if k != "text.safetensors"}
    write_shard(tmp_path / "missing.tar", [missing])
    with pytest.raises(DataError, match=r"missing.tar, sample 000000001: missing key\(s\) \['text.safetensors'\]"):
        list(ShardDataset(tmp_path / "missing.tar", shuffle=0))
    wrong = sample(2)
    meta = json.loads(wrong["json"])
    wrong["json"] = json.dumps(dict(meta, shape=[9, 9, 9, 9])).encode()
    write_shard(tmp_path / "wrong.tar", [wrong])
    with pytest.raises(DataError, match=r"wrong.tar, sample 000000002: .* shape \[4, 2, 2, 2\], expected"):
        list(ShardDataset(tmp_path / "wrong.tar", shuffle=0))
    old = sample(3)
    old["json"] = json.dumps(dict(json.loads(old["json"]), schema=0)).encode()
    write_shard(tmp_path / "old.tar", [old])
    with pytest.raises(DataError, match="schema version 0"):
        list(ShardDataset(tmp_path / "old.tar", shuffle=0))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.tar shards"):
        ShardDataset(tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        shard_urls(tmp_path / "nope")


def test_ode_pairs_roundtrip(tmp_path):
    text = torch.zeros(8, 5)
    text[:2] = 1.0
    pairs = [{"ode_latents": torch.randn(5, 4, 3, 2, 2), "ode_timesteps": torch.tensor([1000., 937.5, 833.3, 625., 0.]),
              "text_emb": text, "text_len": 2, "caption": f"c{i}"} for i in range(5)]
    manifest = write_ode_pairs(tmp_path, pairs, shard_size=2)
    assert manifest["counts"]["written"] == 5 and len(shard_urls(tmp_path / "manifest.json")) == 3
    got = {s["key"]: s for s in ode_pair_dataset(tmp_path, shuffle=0)}
    for i, p in enumerate(pairs):
        s = got[f"{i:09d}"]
        assert torch.equal(s["ode_latents"], p["ode_latents"].to(torch.bfloat16).float())
        assert torch.equal(s["ode_timesteps"], p["ode_timesteps"]) and s["text_len"] == 2
    batch = collate(list(got.values()))
    assert batch["ode_latents"].shape == (5, 5, 4, 3, 2, 2) and batch["ode_timesteps"].shape == (5, 5)


def test_prompt_lists(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red ball"}\n{"caption": "a blue ball"}\n')
    ds = PromptDataset(tmp_path / "p.jsonl")
    assert [ds[i]["caption"] for i in range(2)] == ["a red ball", "a blue ball"] and "text_emb" not in ds[0]
    toy = PromptDataset.from_toyworld(4)
    batch = collate([toy[i] for i in range(4)])
    assert batch["text_emb"].shape == (4, 16, 32) and len(batch["caption"]) == 4
