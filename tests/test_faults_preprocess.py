"""Fault injection: `forcelab preprocess` inputs and flags (data/preprocess.py), in-process.

Bad flags and unusable manifests: exit status 2 and one line naming the thing, before any
work. A bad single input (caption file not UTF-8, a manifest row without a usable path):
skipped and recorded with its reason, or one line with --strict. Never a traceback.
"""

import json
import os

import pytest

from forcelab import cli, fsio
from forcelab.data.shards import ShardDataset
from forcelab.data.toyworld import ToyWorld
from forcelab.data.video import write_video

COMMON = ["--vae", "toy", "--text-encoder", "toy", "--size", "32x32", "--frames", 9, "--fps", 8]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    world = ToyWorld()
    for i in range(3):
        clip = world.clip(i, frames=12)
        write_video(folder / f"v{i}.mp4", clip.video.permute(0, 2, 3, 1), fps=8)
        (folder / f"v{i}.txt").write_text(clip.scene.caption)
    return folder


def run(*argv):
    return cli.main(["preprocess", "--quiet", *map(str, argv)])


def one_line_error(capsys, *argv) -> str:
    capsys.readouterr()  # drop what earlier runs printed
    rc = run(*argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, (rc, err)
    assert err[0].startswith("forcelab preprocess: error:")
    return err[0]


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


BAD_FLAGS = {
    "frames-0": (["--frames", 0], "argument --frames: must be a whole number >= 1, got '0'"),
    "frames-neg": (["--frames", -3], "argument --frames: must be a whole number >= 1"),
    "fps-neg": (["--fps", -8], "argument --fps: must be between 0.01 and 1000"),
    "fps-0": (["--fps", 0], "argument --fps: must be between 0.01 and 1000"),
    "fps-inf": (["--fps", "inf"], "argument --fps: must be a finite number"),
    "fps-huge": (["--fps", "1e30"], "argument --fps: must be between 0.01 and 1000"),
    "fps-tiny": (["--fps", "1e-30"], "argument --fps: must be between 0.01 and 1000"),
    "start-neg": (["--start", -5], "argument --start: must be >= 0"),
    "batch-0": (["--batch-size", 0], "argument --batch-size"),
    "shard-0": (["--shard-size", 0], "argument --shard-size"),
    "workers-neg": (["--workers", -1], "argument --workers"),
    "size-0": (["--size", "0x32"], "--size '0x32': write HxW"),
    "size-text": (["--size", "big"], "--size 'big': write HxW"),
    "size-stride": (["--size", "30x30"], "needs multiples of"),
    "size-huge": (["--size", "100000x100000"], "--size 100000x100000 x --frames 9 x --batch-size 4 (0 workers) needs "
                  "about"),
    "frames-huge": (["--frames", 10**7 + 1], "x --frames 10000001 x"),
    "workers-huge": (["--workers", 100000], f"--workers must be between 0 and {4 * (os.cpu_count() or 1)}"),
    "device": (["--device", "gpu0"], "--device 'gpu0': not a device"),
    "dtype": (["--dtype", "fp64"], "argument --dtype: invalid choice"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_fail_before_any_work(videos, tmp_path, capsys, case):
    extra, expected = BAD_FLAGS[case]
    out = tmp_path / "out"
    line = one_line_error(capsys, "--videos", videos, "--out", out, *COMMON, *extra)
    assert expected in line, line
    assert not (out / "manifest.json").exists() and not list(out.glob("shard-*")) if out.exists() else True


@pytest.mark.parametrize("case", ["empty-csv", "header-only-csv", "empty-jsonl", "blank-jsonl", "no-path-column"])
def test_manifests_without_inputs_are_refused(videos, tmp_path, capsys, case):
    name, text = {"empty-csv": ("m.csv", ""), "header-only-csv": ("m.csv", "path,caption\n"),
                  "empty-jsonl": ("m.jsonl", ""), "blank-jsonl": ("m.jsonl", "\n\n"),
                  "no-path-column": ("m.csv", "file,caption\nv0.mp4,a\n")}[case]
    (videos / name).write_text(text)
    line = one_line_error(capsys, "--videos", videos / name, "--out", tmp_path / "o", *COMMON)
    assert ("no inputs in this manifest" in line) if case != "no-path-column" else ("'path' column" in line)


@pytest.mark.parametrize("name, expected", [("m.tsv", "a .tsv file, not a manifest"), ("missing.csv", "not found"),
                                            ("v0.mp4", "a .mp4 file, not a manifest")])
def test_a_videos_path_that_is_not_a_folder_or_manifest_says_which(videos, tmp_path, capsys, name, expected):
    path = tmp_path / name
    if name != "missing.csv":
        path.write_bytes((videos / "v0.mp4").read_bytes() if name.endswith(".mp4") else b"path\tcaption\n")
    line = one_line_error(capsys, "--videos", path, "--out", tmp_path / "o", *COMMON)
    assert f"--videos {path}: {expected} - give a folder of videos" in line, line


def test_a_bom_csv_from_a_spreadsheet_is_accepted(videos, tmp_path):
    (videos / "bom.csv").write_bytes("\ufeffpath,caption\nv0.mp4,a red ball\nv1.mp4,a blue ball\n".encode())
    out = tmp_path / "o"
    assert run("--videos", videos / "bom.csv", "--out", out, *COMMON) == 0
    assert manifest(out)["counts"] == {"inputs": 2, "written": 2, "skipped": 0, "shards": 1}


@pytest.mark.parametrize("case", ["latin1-csv", "binary-jsonl", "binary-prompts", "latin1-prompts-csv"])
def test_text_files_that_are_not_utf8_name_file_and_line(videos, tmp_path, capsys, case):
    if case == "latin1-csv":
        f = videos / "l1.csv"
        f.write_bytes("path,caption\nv0.mp4,a ball\nv1.mp4,un caf\u00e9\n".encode("latin-1"))
        flag, where = "--videos", "l1.csv:3: not UTF-8"
    elif case == "binary-jsonl":
        f = videos / "b.jsonl"
        f.write_bytes(b'{"path": "v0.mp4", "caption": "a"}\n\xff\xd8\xff\xe0JFIF\n')
        flag, where = "--videos", "b.jsonl:2: not UTF-8"
    elif case == "binary-prompts":
        f = tmp_path / "p.txt"
        f.write_bytes(b"\x00\x01\x02\xff")
        flag, where = "--prompts", "p.txt:1: not UTF-8"
    else:
        f = tmp_path / "p.csv"
        f.write_bytes("caption\nok\ncaf\u00e9\n".encode("latin-1"))
        flag, where = "--prompts", "p.csv:3: not UTF-8"
    extra = COMMON if flag == "--videos" else ["--text-encoder", "toy"]
    line = one_line_error(capsys, flag, f, "--out", tmp_path / "o", *extra)
    assert where in line and "save the file as UTF-8" in line


def test_a_latin1_caption_file_is_skipped_and_recorded(videos, tmp_path, capsys):
    folder = tmp_path / "vids"
    folder.mkdir()
    for i in range(3):
        (folder / f"v{i}.mp4").write_bytes((videos / f"v{i}.mp4").read_bytes())
        (folder / f"v{i}.txt").write_text("a ball")
    (folder / "v1.txt").write_bytes("une balle caf\u00e9\n".encode("latin-1"))
    out = tmp_path / "o"
    assert run("--videos", folder, "--out", out, *COMMON) == 0
    m = manifest(out)
    assert m["counts"]["written"] == 2 and m["counts"]["skipped"] == 1
    assert "v1.txt:1: not UTF-8" in m["skipped"][0]["reason"]
    line = one_line_error(capsys, "--videos", folder, "--out", tmp_path / "strict", *COMMON, "--strict")
    assert "v1.txt:1: not UTF-8" in line and "--strict" in line


BAD_ROWS = {
    "no-path": ('{"caption": "a"}', "'path' must be a file name, got None"),
    "path-int": ('{"path": 5, "caption": "a"}', "'path' must be a file name, got 5"),
    "path-empty": ('{"path": "", "caption": "a"}', "'path' must be a file name"),
    "path-nul": ('{"path": "v1\\u0000.mp4", "caption": "a"}', "holds a NUL byte; fix the manifest row"),
    "caption-nul": ('{"path": "v1.mp4", "caption": "a\\u0000b"}', "the caption holds a NUL byte"),
    "caption-list": ('{"path": "v1.mp4", "caption": ["a dog", "a brown dog"]}',
                     "the caption is a list of 2, not one text; give one caption per row"),
    "caption-number": ('{"path": "v1.mp4", "caption": 7}', "the caption is a int, not one text"),
    "no-caption": ('{"path": "v1.mp4"}', "no caption"),
    "missing-video": ('{"path": "nope.mp4", "caption": "a"}', "video file not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_manifest_rows_are_skipped_and_recorded(videos, tmp_path, capsys, case):
    row, reason = BAD_ROWS[case]
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(2):
        (folder / f"v{i}.mp4").write_bytes((videos / f"v{i}.mp4").read_bytes())
    (folder / "m.jsonl").write_text('{"path": "v0.mp4", "caption": "a red ball"}\n' + row + "\n")
    out = tmp_path / "o"
    assert run("--videos", folder / "m.jsonl", "--out", out, *COMMON) == 0
    m = manifest(out)
    assert m["counts"]["written"] == 1 and len(m["skipped"]) == 1 and m["complete"]
    assert reason in m["skipped"][0]["reason"] and m["skipped"][0]["index"] == 1
    assert reason in one_line_error(capsys, "--videos", folder / "m.jsonl", "--out", tmp_path / "s", *COMMON,
                                    "--strict")


def test_a_csv_row_with_missing_fields_is_recorded(videos, tmp_path):
    (videos / "short.csv").write_text("path,caption\nv0.mp4,a ball\nv1.mp4\n")
    out = tmp_path / "o"
    assert run("--videos", videos / "short.csv", "--out", out, *COMMON) == 0
    assert "no caption" in manifest(out)["skipped"][0]["reason"]


def test_a_csv_row_with_more_cells_than_columns_is_recorded_not_cut(videos, tmp_path):
    """An unquoted comma in a caption: the caption would silently lose its tail."""
    (videos / "long.csv").write_text('path,caption\nv0.mp4,"a red ball, bouncing"\nv1.mp4,a blue ball, bouncing\n')
    out = tmp_path / "o"
    assert run("--videos", videos / "long.csv", "--out", out, *COMMON) == 0
    m = manifest(out)
    assert m["counts"]["written"] == 1 and len(m["skipped"]) == 1
    assert "long.csv:3: 1 more cell(s) than the header has columns ([' bouncing'])" in m["skipped"][0]["reason"]
    assert "needs quotes" in m["skipped"][0]["reason"]
    (tmp_path / "p.csv").write_text("prompt\na red ball, bouncing\n")
    assert run("--prompts", tmp_path / "p.csv", "--out", tmp_path / "p", "--text-encoder", "toy") == 2


def test_json_rows_that_are_not_objects(videos, tmp_path, capsys):
    (videos / "bad.jsonl").write_text('{"path": "v0.mp4", "caption": "c"}\n["v1.mp4", "c"]\n')
    line = one_line_error(capsys, "--videos", videos / "bad.jsonl", "--out", tmp_path / "o", *COMMON)
    assert "bad.jsonl:2: expected a JSON object" in line


def test_prompt_rows_without_text_are_skipped_and_recorded(tmp_path):
    (tmp_path / "p.csv").write_text("prompt\na red ball\n\n\"\"\na blue ball\n")
    out = tmp_path / "o"
    assert run("--prompts", tmp_path / "p.csv", "--out", out, "--text-encoder", "toy") == 0
    m = manifest(out)
    assert m["counts"]["written"] == 2 and m["counts"]["skipped"] == 1
    assert "empty prompt" in m["skipped"][0]["reason"]


@pytest.mark.parametrize("case", ["is-a-file", "under-a-file", "read-only", "user-folder"])
def test_unusable_out_folders_fail_before_any_work(videos, tmp_path, capsys, monkeypatch, case):
    out = tmp_path / "out"
    if case == "user-folder":  # e.g. --out pointing at the videos' own folder with its manifest.json
        out.mkdir()
        (out / "manifest.json").write_text("mine")
        expected = "holds other files and no preprocess run"
    elif case == "is-a-file":
        out.write_text("mine")
        expected = "is a file, not a folder"
    elif case == "under-a-file":
        (tmp_path / "f").write_text("mine")
        out, expected = tmp_path / "f" / "o", "cannot be created"
    else:
        monkeypatch.setattr(fsio, "_writable", lambda d: False)
        expected = "not writable"
    assert expected in one_line_error(capsys, "--videos", videos, "--out", out, *COMMON)
    if case == "user-folder":
        assert [p.name for p in out.iterdir()] == ["manifest.json"] and (out / "manifest.json").read_text() == "mine"


def test_out_with_tilde_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a\n")
    assert run("--prompts", tmp_path / "p.txt", "--out", "~/prompts", "--text-encoder", "toy") == 0
    assert (tmp_path / "home" / "prompts" / "manifest.json").is_file() and not (tmp_path / "~").exists()


# ---------------------------------------------------------------------- resume refusals
@pytest.mark.parametrize("change", ["added", "removed", "caption"])
def test_a_refused_resume_names_the_changed_input(videos, tmp_path, capsys, change):
    folder = tmp_path / "vids"
    folder.mkdir()
    for i in range(2):
        (folder / f"v{i}.mp4").write_bytes((videos / f"v{i}.mp4").read_bytes())
        (folder / f"v{i}.txt").write_text(f"ball {i}")
    out = tmp_path / "o"
    assert run("--videos", folder, "--out", out, *COMMON) == 0
    if change == "added":
        (folder / "v2.mp4").write_bytes((videos / "v2.mp4").read_bytes())
        (folder / "v2.txt").write_text("new")
        expected = f"added: {folder / 'v2.mp4'}"
    elif change == "removed":
        (folder / "v1.mp4").unlink()
        expected = f"removed: {folder / 'v1.mp4'}"
    else:
        (folder / "v0.txt").write_text("another caption")
        expected = f"caption changed: {folder / 'v0.mp4'}"
    line = one_line_error(capsys, "--videos", folder, "--out", out, *COMMON)
    assert "inputs changed (" + expected in line and "use a new --out" in line
    assert len(list(ShardDataset(out, shuffle=0))) == 2  # the earlier run is untouched


def test_frames_zero_as_a_subprocess(videos, tmp_path):
    """The console entry point: exit 2 and one line (it used to skip everything and exit 0)."""
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "forcelab", "preprocess", "--videos", str(videos), "--out",
                        str(tmp_path / "o"), *map(str, COMMON), "--frames", "0"],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--frames" in r.stderr
    assert not (tmp_path / "o").exists()


def test_a_full_disk_while_writing_a_shard_is_one_line_naming_the_shard(tmp_path, capsys, monkeypatch):
    """The system's error while a writer fills a temporary carries no file name (or the
    temporary's); the atomic writer names the file being written."""
    import errno
    import tarfile

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    (tmp_path / "p.txt").write_text("a red ball\n")
    monkeypatch.setattr(tarfile.TarFile, "addfile", full_disk)
    out = tmp_path / "out"
    line = one_line_error(capsys, "--prompts", tmp_path / "p.txt", "--out", out, "--text-encoder", "toy")
    assert f"{out / 'shard-000000.tar'}: No space left on device; free space on that disk" in line, line
    assert not [p for p in out.iterdir() if p.name.endswith(".tar") or fsio.TMP_TAG in p.name]
