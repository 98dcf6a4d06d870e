"""Fault injection: damaged shards and manifests (data/shards.py, data/preprocess.py resume).

preprocess records each shard's sample count, size and sha256 in shard-k.json. A damaged
finished shard is detected when a run resumes (and redone) and when a dataset opens or reads
it (a DataError naming the shard and what to do) - never read as a shorter valid shard.
"""

import io
import json
import shutil
import tarfile

import pytest

from forcelab import cli, fsio
from forcelab.data.preprocess import MANIFEST_FILE
from forcelab.data.schema import DataError
from forcelab.data.shards import ShardDataset, file_sha256, sample_sha256, shard_urls, write_shard

N = 6


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished prompt-shard run: 6 prompts in shards of 3 (prompt shards are fast to make)."""
    root = tmp_path_factory.mktemp("run")
    (root / "p.txt").write_text("".join(f"prompt {i}\n" for i in range(N)))
    assert run(root) == 0
    return root


def run(root, *extra):
    return cli.main(["preprocess", "--quiet", "--prompts", str(root / "p.txt"), "--out", str(root / "out"),
                     "--text-encoder", "toy", "--shard-size", "3", *extra])


@pytest.fixture
def copy(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def keys(out, **kwargs):
    return sorted(s["key"] for s in ShardDataset(out, shuffle=0, require=(), **kwargs))


def member_end(data: bytes, k: int) -> int:
    m = tarfile.open(fileobj=io.BytesIO(data)).getmembers()[k]
    return m.offset_data + ((m.size + 511) // 512) * 512


def test_records_hold_count_size_and_checksum(finished):
    out = finished / "out"
    for k in range(2):
        tar, record = out / f"shard-{k:06d}.tar", json.loads((out / f"shard-{k:06d}.json").read_text())
        assert record["samples"] == 3 and record["bytes"] == tar.stat().st_size
        assert record["sha256"] == file_sha256(tar)
        with tarfile.open(tar) as t:                     # and each sample's sha256, by key
            by_key = {}
            for m in t.getmembers():
                key, _, member = m.name.partition(".")
                by_key.setdefault(key, {"__key__": key})[member] = t.extractfile(m).read()
        assert record["sample_sha256"] == {k: sample_sha256(s) for k, s in by_key.items()}
        assert sorted(record["sample_sha256"]) == [f"{i:09d}" for i in range(3 * k, 3 * k + 3)]
    assert keys(out) == [f"{i:09d}" for i in range(N)]


@pytest.mark.parametrize("damage", ["cut-at-member-zero-padded", "cut-mid-member", "truncated-to-zero",
                                    "padded", "bit-flip", "deleted"])
def test_a_damaged_finished_shard_is_detected_at_open_and_redone_on_resume(copy, capsys, damage):
    out = copy / "out"
    tar = out / "shard-000000.tar"
    data = tar.read_bytes()
    if damage == "cut-at-member-zero-padded":  # a valid-looking tar with 2 of 3 samples (2 members each)
        tar.write_bytes(data[:member_end(data, 3)] + b"\0" * 1024)
    elif damage == "cut-mid-member":
        tar.write_bytes(data[:len(data) // 2 + 100])
    elif damage == "truncated-to-zero":
        tar.write_bytes(b"")
    elif damage == "padded":
        tar.write_bytes(data + b"\0" * 512)
    elif damage == "bit-flip":  # same size: only the checksum tells
        flipped = bytearray(data)
        flipped[member_end(data, 0) - 600] ^= 0xFF
        tar.write_bytes(bytes(flipped))
    else:
        tar.unlink()
    verify = "checksum" if damage == "bit-flip" else "size"
    with pytest.raises(DataError) as e:
        keys(out, verify=verify)
    msg = str(e.value)
    assert "shard-000000.tar" in msg and "re-run preprocess" in msg and "\n" not in msg
    # resuming notices it, writes that shard again and leaves the other alone
    other = (out / "shard-000001.tar").stat().st_mtime_ns
    capsys.readouterr()
    assert run(copy) == 0
    if damage != "deleted":
        assert "shard-000000.tar" in capsys.readouterr().err
    assert (out / "shard-000001.tar").stat().st_mtime_ns == other
    assert keys(out, verify="checksum") == [f"{i:09d}" for i in range(N)]
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["complete"] and manifest["counts"]["written"] == N


def test_sample_counts_are_checked_while_reading(copy):
    """Without the open-time check, the reader still refuses a shard shorter than its record."""
    out = copy / "out"
    tar = out / "shard-000001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[:member_end(data, 3)] + b"\0" * 1024)
    with pytest.raises(DataError, match=r"shard-000001.tar: 2 samples, its record says 3"):
        keys(out, verify="none")


def test_a_manifest_whose_shards_are_all_empty(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    write_shard(out / "shard-000000.tar", [])
    (out / MANIFEST_FILE).write_text(json.dumps({"shards": [{"name": "shard-000000.tar", "samples": 0}],
                                                 "skipped": [{"index": 0}]}))
    with pytest.raises(DataError, match="no samples - the manifest lists 1 shard"):
        ShardDataset(out / MANIFEST_FILE)


@pytest.mark.parametrize("text,match", [("{", "not a preprocess manifest"),
                                        ('{"shards": 5}', "not a preprocess manifest"),
                                        ('{"shards": [{"name": "a.tar"}]}', "not a preprocess manifest"),
                                        (b"\xff\xfe", "not a preprocess manifest")])
def test_damaged_manifests(tmp_path, text, match):
    f = tmp_path / MANIFEST_FILE
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DataError, match=match):
        shard_urls(f)


def test_manifest_shard_names_stay_in_its_folder(tmp_path, finished):
    manifest = json.loads((finished / "out" / MANIFEST_FILE).read_text())
    manifest["shards"][0]["name"] = "../../elsewhere/shard-000000.tar"
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert all(u.startswith(str(tmp_path)) for u in shard_urls(tmp_path / MANIFEST_FILE))


def test_bad_verify_mode(finished):
    with pytest.raises(DataError, match="verify must be one of"):
        ShardDataset(finished / "out", verify="md5")


def test_shards_without_records_are_still_readable(tmp_path, finished):
    """A tar written by other tools (no shard-k.json) has nothing to verify against."""
    shutil.copy(finished / "out" / "shard-000000.tar", tmp_path / "x.tar")
    assert len(keys(tmp_path, verify="checksum")) == 3


def test_a_killed_shard_write_leaves_only_a_temporary_that_the_next_run_removes(copy, monkeypatch):
    out = copy / "out"
    (out / "shard-000001.tar").unlink()
    (out / "shard-000001.json").unlink()
    dead = fsio._tmp_name(out / "shard-000001.tar")
    dead = dead.with_name(dead.name.replace(f"-{__import__('os').getpid()}-", "-999999999-"))
    dead.write_bytes(b"partial")
    assert run(copy) == 0
    assert not dead.exists()
    assert [p.name for p in out.iterdir() if ".forcelab-" in p.name] == []
    assert keys(out, verify="checksum") == [f"{i:09d}" for i in range(N)]
