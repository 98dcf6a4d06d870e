"""`forcelab preprocess` -> shards -> ShardDataset (data/preprocess.py, data/shards.py)."""

import io
import json
import tarfile

import pytest
import torch

from forcelab import cli
from forcelab.data import preprocess
from forcelab.data.schema import DataError
from forcelab.data.shards import ShardDataset, count_samples, shard_loader, shard_urls
from forcelab.data.toyworld import ToyWorld
from forcelab.data.video import read_video, write_video
from forcelab.errors import ForcelabError
from forcelab.models.autoencoder import load_autoencoder, save_tiny_wan_vae
from forcelab.models.text_encoder import UMT5TextEncoder, load_text_encoder, save_tiny_umt5


def make_videos(folder, n, frames=12, captions=True):
    """n toy world mp4s (+ sidecar captions) in folder; returns their captions."""
    folder.mkdir(parents=True, exist_ok=True)
    world, out = ToyWorld(), []
    for i in range(n):
        clip = world.clip(i, frames=frames)
        write_video(folder / f"v{i:02d}.mp4", clip.video.permute(0, 2, 3, 1), fps=8)
        if captions:
            (folder / f"v{i:02d}.txt").write_text(clip.scene.caption)
        out.append(clip.scene.caption)
    return out


def run_cli(*argv):
    return cli.main(["preprocess", "--quiet", *map(str, argv)])


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    make_videos(folder, 5)
    return folder


def test_shards_hold_exactly_what_the_encoders_produced(videos, tmp_path, monkeypatch):
    vae_dir, te_dir = save_tiny_wan_vae(tmp_path / "tinyvae"), save_tiny_umt5(tmp_path / "umt5")
    produced, texts = [], {}

    def recording(vae, batch):
        z = vae.encode(batch)
        produced.append(z)
        return z

    def recording_text(self, prompts):
        emb, lengths = encode_text(self, prompts)
        texts.update({p: (e, n) for p, e, n in zip(prompts, emb, lengths)})
        return emb, lengths

    encode_text = UMT5TextEncoder.encode
    monkeypatch.setattr(preprocess, "encode_batch", recording)
    monkeypatch.setattr(UMT5TextEncoder, "encode", recording_text)
    out = tmp_path / "shards"
    rc = run_cli("--videos", videos, "--out", out, "--vae", vae_dir, "--text-encoder", te_dir, "--size", "16x16",
                 "--frames", 9, "--fps", 8, "--batch-size", 2, "--shard-size", 3)
    assert rc == 0 and len(produced) == 3  # batches of 2, 1 (shard 0) and 2 (shard 1)
    latents = torch.cat(produced)
    assert latents.shape == (5, 16, 3, 2, 2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"inputs": 5, "written": 5, "skipped": 0, "shards": 2}

    monkeypatch.undo()
    captions = [(videos / f"v{i:02d}.txt").read_text() for i in range(5)]
    fresh, lengths = load_text_encoder(str(te_dir)).encode(captions)
    samples = {s["key"]: s for s in ShardDataset(out, shuffle=0)}
    assert sorted(samples) == [f"{i:09d}" for i in range(5)]
    for i in range(5):
        s = samples[f"{i:09d}"]
        assert torch.equal(s["latent"], latents[i].to(torch.bfloat16).float())
        emb, n = texts[captions[i]]
        assert s["text_len"] == n == lengths[i] and s["caption"] == captions[i]
        assert s["text_emb"].shape == (512, 32)
        assert torch.equal(s["text_emb"], emb.to(torch.bfloat16).float())  # zeros past text_len included
        torch.testing.assert_close(s["text_emb"], fresh[i], atol=0.02, rtol=0.01)  # bf16 storage
        meta = s["meta"]
        assert meta["vae"] == f"wan-vae:{vae_dir.name}" and meta["text_encoder"] == f"umt5:{te_dir.name}"
        assert (meta["shape"], meta["dtype"], meta["frames"], meta["fps"]) == ([16, 3, 2, 2], "bfloat16", 9, 8.0)
        assert meta["source"].endswith(f"v{i:02d}.mp4")
    # the clip that went in is the one read_video gives
    clip = read_video(videos / "v00.mp4", fps=8, frames=9, size=(16, 16), dtype="float")
    z = load_autoencoder(str(vae_dir)).encode(clip.permute(1, 0, 2, 3)[None])
    torch.testing.assert_close(z[0], latents[0], atol=1e-5, rtol=1e-5)
    batch = next(iter(shard_loader(ShardDataset(out, shuffle=0), batch_size=4, num_workers=0)))
    assert batch["latent"].shape == (4, 16, 3, 2, 2) and batch["text_emb"].shape == (4, 512, 32)
    assert batch["text_len"].dtype == torch.long


def test_bad_inputs_are_skipped_and_recorded_or_fail_with_strict(videos, tmp_path):
    folder = tmp_path / "mixed"
    make_videos(folder, 2)
    (folder / "v01.txt").unlink()                                    # missing caption
    (folder / "corrupt.mp4").write_bytes(b"not a video" * 50)        # corrupt
    (folder / "corrupt.txt").write_text("a red ball")
    out = tmp_path / "out"
    assert run_cli("--videos", folder, "--out", out, "--vae", "toy", "--text-encoder", "toy",
                   "--size", "32x32", "--frames", 9, "--fps", 8, "--workers", 2) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["written"] == 1 and manifest["counts"]["skipped"] == 2
    reasons = {s["source"].rsplit("/", 1)[-1]: s["reason"] for s in manifest["skipped"]}
    assert "corrupt.mp4: cannot" in reasons["corrupt.mp4"]
    assert "v01.mp4: no caption - add v01.txt" in reasons["v01.mp4"]
    assert count_samples(out) == 1

    with pytest.raises(ForcelabError, match="corrupt.mp4: cannot .*--strict"):
        preprocess.run(_args("--videos", folder, "--out", tmp_path / "strict", "--vae", "toy",
                             "--text-encoder", "toy", "--size", "32x32", "--frames", 9, "--strict"))
    # through the CLI a user error is one line and exit status 2
    assert run_cli("--videos", folder, "--out", tmp_path / "strict2", "--vae", "toy", "--text-encoder", "toy",
                   "--size", "32x32", "--frames", 9, "--strict") == 2
    # manifests: csv with relative paths, and a too-short clip is skipped with the reason; nothing
    # usable was written, so the run is an error (exit 2) whose manifest still lists every reason
    (folder / "list.csv").write_text("path,caption\nv00.mp4,a red ball\nv01.mp4,\n")
    out = tmp_path / "csv"
    assert run_cli("--videos", folder / "list.csv", "--out", out, "--vae", "toy", "--text-encoder", "toy",
                   "--size", "32x32", "--frames", 13, "--fps", 8) == 2
    skipped = json.loads((out / "manifest.json").read_text())["skipped"]
    assert "too short" in skipped[0]["reason"] and "no caption" in skipped[1]["reason"]


def test_user_errors(videos, tmp_path):
    with pytest.raises(ForcelabError, match="4k\\+1"):
        preprocess.run(_args("--videos", videos, "--out", tmp_path / "a", "--vae", save_tiny_wan_vae(tmp_path / "v"),
                             "--text-encoder", "toy", "--size", "16x16", "--frames", 8))
    with pytest.raises(ForcelabError, match="not found"):
        preprocess.run(_args("--videos", tmp_path / "nothing", "--out", tmp_path / "b", "--vae", "toy",
                             "--text-encoder", "toy"))
    (tmp_path / "bad.jsonl").write_text('{"path": "x.mp4", "caption": "c"}\nnot json\n')
    with pytest.raises(ForcelabError, match="bad.jsonl:2: not valid JSON"):
        preprocess.run(_args("--videos", tmp_path / "bad.jsonl", "--out", tmp_path / "c", "--vae", "toy",
                             "--text-encoder", "toy"))


def test_resume_after_interruption_without_duplicates(videos, tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = ["--videos", videos, "--out", out, "--vae", "toy", "--text-encoder", "toy", "--size", "32x32",
            "--frames", 9, "--fps", 8, "--shard-size", 2, "--batch-size", 2]
    real_write, calls = preprocess.write_shard, []

    def interrupted(path, samples):
        calls.append(path.name)
        if len(calls) == 2:  # dies while writing the second shard
            path.with_name(path.name + ".tmp").write_bytes(b"partial")
            raise KeyboardInterrupt
        return real_write(path, samples)

    monkeypatch.setattr(preprocess, "write_shard", interrupted)
    assert run_cli(*argv) == 130
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.json", "shard-000000.tar",
                                                            "shard-000001.tar.tmp"]
    first = (out / "shard-000000.tar").stat().st_mtime_ns
    calls.clear()
    monkeypatch.setattr(preprocess, "write_shard", lambda p, s: calls.append(p.name) or real_write(p, s))
    assert run_cli(*argv) == 0
    assert calls == ["shard-000001.tar", "shard-000002.tar"]  # the finished shard is not redone
    assert (out / "shard-000000.tar").stat().st_mtime_ns == first
    keys = [s["key"] for s in ShardDataset(out, shuffle=0)]
    assert sorted(keys) == [f"{i:09d}" for i in range(5)]
    assert json.loads((out / "manifest.json").read_text())["counts"]["written"] == 5
    # a third run has nothing to do; other settings in the same folder are refused
    calls.clear()
    assert run_cli(*argv) == 0 and calls == []
    with pytest.raises(ForcelabError, match="other settings .*frames: 9 before, 5 now"):
        preprocess.run(_args(*argv[:-6], "--frames", 5, "--fps", 8, "--shard-size", 2))


def test_truncated_shard_error_names_the_shard(videos, tmp_path):
    out = tmp_path / "out"
    assert run_cli("--videos", videos, "--out", out, "--vae", "toy", "--text-encoder", "toy", "--size", "32x32",
                   "--frames", 9, "--fps", 8, "--shard-size", 5) == 0
    shard = out / "shard-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])
    # the reader's own checks (the record's size check at open is tested in test_faults_shards)
    with pytest.raises(DataError, match="shard-000000.tar: truncated"):
        list(ShardDataset(out, shuffle=0, verify="none"))
    # cut exactly after a member: still a valid-looking tar without the end marker
    members = tarfile.open(fileobj=io.BytesIO(data)).getmembers()
    cut = members[3].offset_data + ((members[3].size + 511) // 512) * 512
    shard.write_bytes(data[:cut])
    with pytest.raises(DataError, match="shard-000000.tar: truncated"):
        list(ShardDataset(out, shuffle=0, verify="none"))
    # a damaged member inside a complete tar is reported by the webdataset reader, naming the shard
    broken = bytearray(data)
    broken[members[0].offset:members[0].offset + 512] = b"\xff" * 512
    shard.write_bytes(bytes(broken))
    with pytest.raises(DataError, match="shard-000000.tar"):
        list(ShardDataset(out, shuffle=0, verify="none"))


def test_prompt_shards(tmp_path):
    from forcelab.data.prompts import PromptDataset

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n\na blue ball moving quickly\na green ball\n")
    out = tmp_path / "p"
    assert run_cli("--prompts", prompts, "--out", out, "--text-encoder", "toy", "--shard-size", 2) == 0
    ds = PromptDataset(out)
    assert len(ds) == 3 and ds[1]["caption"] == "a blue ball moving quickly"
    emb, lengths = load_text_encoder("toy").encode(["a blue ball moving quickly"])
    assert ds[1]["text_len"] == lengths[0] and torch.equal(ds[1]["text_emb"], emb[0].to(torch.bfloat16).float())
    assert "latent" not in ds[1]
    with pytest.raises(DataError, match="missing key.*latent.safetensors"):
        list(ShardDataset(out, shuffle=0))  # prompt shards are not latent shards
    assert len(shard_urls(out / "manifest.json")) == 2


def _args(*argv):
    import argparse

    parser = argparse.ArgumentParser()
    preprocess.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv] + ["--quiet"])
