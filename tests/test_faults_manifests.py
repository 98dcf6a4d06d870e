"""Fault injection: whose word a path is - the user's manifest, or names that come from data.

A manifest, like a CLI argument, is the user's own word: its paths may be absolute or lead
outside its folder (relative ones start from --root, default the manifest's folder). What
comes from data never leaves its folder: output names and keys of preprocess, and the paths
recorded in a results file that `eval report` embeds. Every input preprocess cannot use is
recorded; a run with nothing usable is exit 2 and one line.
"""

import json
import os

import pytest

from forcelab import cli
from forcelab.data.shards import ShardDataset
from forcelab.data.toyworld import ToyWorld
from forcelab.data.video import write_video

COMMON = ["--vae", "toy", "--text-encoder", "toy", "--size", "32x32", "--frames", 9, "--fps", 8]
OWN_FILES = {"manifest.json", "preprocess.json", "inputs.json", "shard-000000.tar", "shard-000000.json"}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two toy videos in <root>/clips; manifests go to <root>/lists."""
    root = tmp_path_factory.mktemp("data")
    (root / "clips").mkdir()
    (root / "lists").mkdir()
    for i in range(2):
        write_video(root / "clips" / f"v{i}.mp4", ToyWorld().clip(i, frames=12).video.permute(0, 2, 3, 1), fps=8)
    return root


def run(*argv):
    return cli.main(["preprocess", "--quiet", *map(str, argv)])


def one_line_error(capsys, *argv) -> str:
    capsys.readouterr()
    rc = run(*argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, (rc, err)
    assert err[0].startswith("forcelab preprocess: error:")
    return err[0]


def written(out):
    m = json.loads((out / "manifest.json").read_text())
    return m["counts"]["written"], m["skipped"]


def own_files(out):
    return {p.name for p in out.iterdir() if not p.name.startswith(".")}


@pytest.mark.parametrize("style", ["absolute-inside", "absolute-elsewhere", "dot-dot", "tilde"])
def test_manifest_paths_are_the_users_word(clips, tmp_path, monkeypatch, style):
    lists = clips / "lists"
    if style == "absolute-inside":      # a manifest beside its clips, listing them by absolute path
        manifest, paths = clips / "clips" / "abs.csv", [clips / "clips" / f"v{i}.mp4" for i in range(2)]
    elif style == "absolute-elsewhere":
        manifest, paths = tmp_path / "abs.csv", [clips / "clips" / f"v{i}.mp4" for i in range(2)]
    elif style == "dot-dot":
        manifest, paths = lists / "rel.csv", [f"../clips/v{i}.mp4" for i in range(2)]
    else:
        monkeypatch.setenv("HOME", str(clips))
        manifest, paths = lists / "home.csv", [f"~/clips/v{i}.mp4" for i in range(2)]
    manifest.write_text("path,caption\n" + "".join(f"{p},a red ball\n" for p in paths))
    out = tmp_path / "out"
    assert run("--videos", manifest, "--out", out, *COMMON) == 0
    assert written(out) == (2, [])
    assert own_files(out) <= OWN_FILES | {".forcelab"} and not (tmp_path / "clips").exists()


def test_root_resolves_relative_paths(clips, tmp_path, capsys):
    manifest = clips / "lists" / "bare.jsonl"
    manifest.write_text("".join(json.dumps({"path": f"v{i}.mp4", "caption": "a ball"}) + "\n" for i in range(2)))
    out = tmp_path / "with-root"
    assert run("--videos", manifest, "--root", clips / "clips", "--out", out, *COMMON) == 0
    assert written(out) == (2, [])
    # without --root the names start from the manifest's folder: nothing there, so nothing usable
    line = one_line_error(capsys, "--videos", manifest, "--out", tmp_path / "no-root", *COMMON)
    assert "nothing usable: all 2 input(s) were skipped" in line and "video file not found" in line
    assert written(tmp_path / "no-root")[0] == 0 and len(written(tmp_path / "no-root")[1]) == 2


@pytest.mark.parametrize("case", ["not-a-folder", "with-prompts", "with-a-video-folder"])
def test_root_misuse_is_one_line(clips, tmp_path, capsys, case):
    manifest = clips / "lists" / "r.csv"
    manifest.write_text("path,caption\nv0.mp4,a\n")
    if case == "not-a-folder":
        argv, expected = ["--videos", manifest, "--root", tmp_path / "nope", *COMMON], "not a folder"
    elif case == "with-prompts":
        (tmp_path / "p.txt").write_text("a\n")
        argv, expected = ["--prompts", tmp_path / "p.txt", "--root", clips, "--text-encoder", "toy"], "applies to"
    else:
        argv, expected = ["--videos", clips / "clips", "--root", clips, *COMMON], "applies to"
    line = one_line_error(capsys, *argv, "--out", tmp_path / "o")
    assert f"--root {argv[argv.index('--root') + 1]}: " in line and expected in line
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_names_from_data_never_name_outputs(clips, tmp_path):
    """Paths and captions that look like file names go into meta only: outputs are shard-k, keys indices."""
    manifest = clips / "lists" / "sly.jsonl"
    rows = [{"path": "../clips/v0.mp4", "caption": "../../../../owned"},
            {"path": str(clips / "clips" / "v1.mp4"), "caption": "/elsewhere/evil.mp4"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = sorted(os.listdir(tmp_path))
    out = tmp_path / "out"
    assert run("--videos", manifest, "--out", out, *COMMON) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["out"]) and own_files(out) <= OWN_FILES | {".forcelab"}
    samples = sorted(ShardDataset(out, shuffle=0), key=lambda s: s["key"])
    assert [s["key"] for s in samples] == ["000000000", "000000001"]
    assert [s["caption"] for s in samples] == ["../../../../owned", "/elsewhere/evil.mp4"]


@pytest.mark.parametrize("listing", ["folder", "manifest"])
def test_a_dangling_symlink_a_fifo_and_a_nul_caption_are_recorded(clips, tmp_path, listing):
    folder = tmp_path / "vids"
    folder.mkdir()
    for name in ("v0", "nul"):
        (folder / f"{name}.mp4").write_bytes((clips / "clips" / "v0.mp4").read_bytes())
    (folder / "gone.mp4").symlink_to(tmp_path / "moved-away.mp4")
    os.mkfifo(folder / "pipe.mp4")                      # never opened: reading a FIFO would block
    captions = {"v0": "a ball", "gone": "a ball", "pipe": "a ball", "nul": "a\0ball"}
    for name, caption in captions.items():
        (folder / f"{name}.txt").write_text(caption)
    if listing == "manifest":
        (tmp_path / "m.jsonl").write_text("".join(json.dumps({"path": str(folder / f"{n}.mp4"), "caption": c}) + "\n"
                                                  for n, c in captions.items()))
    out = tmp_path / "out"
    assert run("--videos", folder if listing == "folder" else tmp_path / "m.jsonl", "--out", out, *COMMON) == 0
    count, skipped = written(out)
    reasons = {os.path.basename(s["source"]): s["reason"] for s in skipped}
    assert count == 1 and sorted(reasons) == ["gone.mp4", "nul.mp4", "pipe.mp4"]
    assert f"a symlink to {tmp_path / 'moved-away.mp4'}, which does not exist" in reasons["gone.mp4"]
    assert "not a regular file" in reasons["pipe.mp4"] and "the caption holds a NUL byte" in reasons["nul.mp4"]


@pytest.mark.parametrize("case", ["txt-nul", "jsonl-list", "csv-nul"])
def test_bad_prompts_are_recorded_and_nothing_usable_is_exit_2(tmp_path, capsys, case):
    name, text, reason = {
        "txt-nul": ("p.txt", "a red ball\nbad\0prompt\n", "p.txt:2: the caption holds a NUL byte"),
        "jsonl-list": ("p.jsonl", '{"prompt": "a red ball"}\n{"prompt": ["a", "b"]}\n',
                       "p.jsonl:2: the caption is a list of 2, not one text"),
        "csv-nul": ("p.csv", "prompt\na red ball\n\"x\0y\"\n", "p.csv:2: the caption holds a NUL byte")}[case]
    (tmp_path / name).write_text(text)
    out = tmp_path / "o"
    assert run("--prompts", tmp_path / name, "--out", out, "--text-encoder", "toy") == 0
    count, skipped = written(out)
    assert count == 1 and len(skipped) == 1 and skipped[0]["reason"].startswith(reason)
    # the same bad prompt alone: nothing usable is written -> exit 2, one line, the manifest keeps the reason
    (tmp_path / f"only-{name}").write_text(text.replace("a red ball", "").replace('{"prompt": ""}\n', ""))
    line = one_line_error(capsys, "--prompts", tmp_path / f"only-{name}", "--out", tmp_path / "o2",
                          "--text-encoder", "toy")
    assert "nothing usable" in line and "'skipped'" in line


# ---------------------------------------------------------------------- eval report: paths recorded in data
def report_record(folder, videos_dir, video="a.mp4"):
    return {"kind": "toybench", "name": "run", "videos_dir": str(videos_dir),
            "spread": {"physics": {"mean": 0.9, "ci95": 0.01}},
            "videos": [{"video": video, "caption": "a ball", "fps": 8.0}]}


@pytest.fixture(scope="module")
def private_video(tmp_path_factory):
    """A video outside every results folder (someone's own file)."""
    folder = tmp_path_factory.mktemp("private")
    write_video(folder / "a.mp4", ToyWorld().clip(0, frames=8).video.permute(0, 2, 3, 1), fps=8)
    return folder


@pytest.mark.parametrize("case", ["absolute-elsewhere", "dot-dot", "symlinked-folder", "inside-relative"])
def test_report_follows_videos_dir_only_inside_the_results_folder(private_video, tmp_path, capsys, case):
    results = tmp_path / "results"
    results.mkdir()
    videos_dir = {"absolute-elsewhere": private_video, "dot-dot": os.path.relpath(private_video, results),
                  "symlinked-folder": "videos", "inside-relative": "videos"}[case]
    if case == "symlinked-folder":
        (results / "videos").symlink_to(private_video)
    elif case == "inside-relative":
        (results / "videos").mkdir()
        (results / "videos" / "a.mp4").write_bytes((private_video / "a.mp4").read_bytes())
    (results / "toybench.json").write_text(json.dumps(report_record(results, videos_dir)))
    out = tmp_path / "report.html"
    capsys.readouterr()
    assert cli.main(["eval", "report", str(results / "toybench.json"), "--out", str(out), "--quiet"]) == 0
    page, err = out.read_text(), capsys.readouterr().err
    if case == "inside-relative":                       # relative to the results file, not the working folder
        assert page.count("data:image/gif;base64,") == 1 and "Left out" not in page and "videos_dir" not in err
    else:
        assert "data:image/gif" not in page
        assert "is outside the results file's folder; its sample videos are not embedded" in err
        assert len(err.strip().splitlines()) == 1 and "Left out" in page
