"""`forcelab eval report`: one self-contained HTML page (and markdown) for any number of runs."""

import base64
import json
import math
import re
from html.parser import HTMLParser
from urllib.parse import unquote

import numpy as np
import pytest

from forcelab.cli import main
from forcelab.data.toyworld import ToyWorld
from forcelab.data.video import write_video
from forcelab.eval.vbench import aggregate


class Page(HTMLParser):
    """Collects images, table rows and text of a page."""

    def __init__(self):
        super().__init__()
        self.images, self.rows, self.text, self._row = [], [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "tr":
            self._row = []

    def handle_endtag(self, tag):
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._row is not None and data.strip():
            self._row.append(data.strip())


def toybench_record(folder, name, slope, adherent=38.0):
    """A toybench.json as `forcelab eval toybench` writes it, with one sample video; adherent:
    its fidelity_adherent (NaN: no video had a frame with exactly the caption's balls)."""
    clip = ToyWorld().clip(3, frames=24)
    write_video(folder / "0000-a-0.mp4", clip.video.permute(0, 2, 3, 1).numpy(), 8.0)
    metrics = ["fidelity_psnr", "physics"]
    buckets = {m: {"mean": [0.9 + slope * b for b in range(3)], "std": [0.01] * 3, "n": [1] * 3} for m in metrics}
    return {"kind": "toybench", "name": name, "videos_dir": str(folder), "metrics": metrics, "bucket_frames": 8,
            "aggregate": {"fidelity_psnr": 40.0, "fidelity_adherent": adherent, "physics": 0.95},
            "spread": {"fidelity_psnr": {"mean": 40.0, "ci95": 1.5}, "physics": {"mean": 0.95, "ci95": 0.02},
                       "fidelity_adherent": {"mean": adherent, "ci95": math.nan if math.isnan(adherent) else 0.0}},
            "buckets": buckets, "videos": [{"video": "0000-a-0.mp4", "caption": clip.scene.caption, "fps": 8.0}],
            "speed_fps": 123.0}


@pytest.fixture
def results(tmp_path):
    paths = []
    for name, slope, adherent in (("student", -0.05, math.nan), ("teacher", 0.0, 38.0)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "toybench.json").write_text(json.dumps(toybench_record(folder, name, slope, adherent)))
        paths.append(folder / "toybench.json")
    (tmp_path / "escape.mp4").write_bytes((tmp_path / "student" / "0000-a-0.mp4").read_bytes())
    scores = {"subject_consistency": 0.95, "temporal_flickering": 0.97, "color": 0.8}
    vbench = {"kind": "vbench", "name": "wan-vbench", "scores": scores, "aggregate": aggregate(scores),
              "videos_dir": str(tmp_path / "student"), "results": {"color": {"videos": {"0000-a-0.mp4": 0.8,
                                                                                      "../escape.mp4": 0.1}}},
              "protocol": {"mode": "VBench-Long", "prompts_file": "all_dimension.txt", "extended_prompts": False,
                           "seeds": [0, 1], "samples_per_prompt": 5, "versions": {"vbench": "0.1.5"}}}
    (tmp_path / "vbench.json").write_text(json.dumps(vbench))
    demo = {"runs": [{"name": "demo-chunkwise", "speed_fps": 41.5, "metrics": {"physics": 0.9}},
                     {"name": "demo-rolling", "speed_fps": 37.25}]}
    (tmp_path / "demo.json").write_text(json.dumps(demo))
    return paths + [tmp_path / "vbench.json", tmp_path / "demo.json"]


def test_report_renders_every_run_with_embedded_images(results, tmp_path):
    out = tmp_path / "rep" / "report.html"
    assert main(["eval", "report", *map(str, results), "--out", str(out), "--quiet"]) == 0
    page = Page()
    page.feed(out.read_text())
    page.close()
    labels = ["student", "teacher", "wan-vbench", "demo-chunkwise", "demo-rolling"]
    summary = [row for row in page.rows if row and row[0] in labels]
    assert [row[0] for row in summary[:5]] == labels                       # one summary row per run
    by_label = {row[0]: row for row in summary[:5]}
    assert "41.5" in by_label["demo-chunkwise"] and "37.25" in by_label["demo-rolling"] and "123" in by_label["student"]
    assert "40 ± 1.5" in by_label["student"]
    header = next(row for row in page.rows if "fidelity_adherent" in row)
    column = header.index("fidelity_adherent")
    assert by_label["student"][column] == "-" and by_label["teacher"][column] == "38"   # NaN: undefined, shown as -
    assert any(cell.startswith(f"{aggregate({'subject_consistency': 0.95, 'temporal_flickering': 0.97, 'color': 0.8})['total']:.4g}")
               for cell in by_label["wan-vbench"])
    assert "VBench-Long" in " ".join(page.text)                          # the protocol is shown
    kinds = []
    for src in page.images:
        assert src.startswith("data:image/")                              # nothing refers outside the page
        mime, data = src[5:].split(";base64,")
        raw = base64.b64decode(data)
        assert raw[:4] == (b"\x89PNG" if mime == "image/png" else b"GIF8")
        kinds.append(mime)
    # across-runs bars, speed bars, drift chart, and a strip + animation per sample video (3 runs x 1;
    # a name leaving the videos folder is not followed)
    assert kinds.count("image/png") == 3 + 3 and kinds.count("image/gif") == 3
    md = out.with_suffix(".md").read_text()
    assert all(label in md for label in labels) and md.count("data:image/gif;base64,") == 3
    # every number is in the page's JSON
    text = "".join(page.text)
    assert '"speed_fps": 41.5' in text and '"color": 0.8' in text and '"seeds": [' in text


def test_report_refuses_what_it_did_not_write_and_bad_input(results, tmp_path):
    other = tmp_path / "notes.html"
    other.write_text("<html>mine</html>")
    assert main(["eval", "report", str(results[0]), "--out", str(other), "--quiet"]) == 2
    assert other.read_text() == "<html>mine</html>"
    assert main(["eval", "report", str(results[0]), "--out", str(tmp_path / "r.png"), "--quiet"]) == 2
    assert main(["eval", "report", str(tmp_path / "missing.json"), "--out", str(tmp_path / "r.html"), "--quiet"]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert main(["eval", "report", str(bad), "--out", str(tmp_path / "r.html"), "--quiet"]) == 2
    # a report it wrote is replaced
    out = tmp_path / "again.html"
    for _ in range(2):
        assert main(["eval", "report", str(results[2]), "--out", str(out), "--quiet"]) == 0


def test_same_names_stay_apart(tmp_path):
    from forcelab.eval.report import load_runs

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for p in (a, b):
        p.write_text(json.dumps({"name": "run", "speed_fps": 1.0, "score": np.float64(0.5).item()}))
    runs = load_runs([a, b])
    assert [r.label for r in runs] == ["run", "run (2)"] and runs[0].metrics["score"] == (0.5, None)


def test_run_folder_curves_config_links_and_vbench_layout(tmp_path):
    """A training run folder gives curves, final losses, its resolved config and sample links;
    `eval vbench`'s default layout (vbench.json beside the videos) keeps the previews; VBench
    dimensions say who scored them; seeds and the protocol are filled in."""
    from forcelab.eval.vbench_runner import run_vbench

    run = tmp_path / "runs" / "teacher"
    (run / "samples" / "step-000004").mkdir(parents=True)
    rows = [{"step": s, "time": 0.1 * s, "steps_per_s": 9.0, "generator/loss": 2.0 - 0.25 * s,
             "generator/grad_norm": 1.0 / s} for s in range(1, 5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "gen')  # cut short
    (run / "config.yaml").write_text("recipe: teacher\nseed: 11\nmax_steps: 4\n")
    (run / "forcelab-run.json").write_text(json.dumps({"recipe": "teacher", "forcelab": "0.test"}))
    clip = ToyWorld().clip(1, frames=8).video.permute(0, 2, 3, 1).numpy()
    for i in range(2):
        write_video(run / "samples" / "step-000004" / f"0{i}.mp4", clip, 8.0)
        (run / "samples" / "step-000004" / f"0{i}.json").write_text(json.dumps({"prompt": "a red ball", "step": 4,
                                                                               "seed": i}))
    videos = tmp_path / "gen" / "videos"
    for i in range(2):
        write_video(videos / f"In a still frame, a stop sign-{i}.mp4", clip, 8.0)
        (videos / f"In a still frame, a stop sign-{i}.json").write_text(json.dumps(
            {"prompt": "In a still frame, a stop sign", "seed": 40 + i, "sample": i}))
    write_video(videos / "a person swimming in ocean-0.mp4", clip, 8.0)         # a prompt no dimension here scores
    vb = run_vbench(videos, dimensions=["temporal_flickering"], native_flickering=True, progress=False)
    assert vb["videos_dir"] == "." and (videos / "vbench.json").is_file()       # beside the videos

    out = tmp_path / "site" / "report.html"
    assert main(["eval", "report", str(run / "metrics.jsonl"), str(videos / "vbench.json"), "--out", str(out),
                 "--quiet"]) == 0
    text = out.read_text()
    page = Page()
    page.feed(text)
    page.close()
    assert "Left out" not in text                                                 # nothing escaped its folder
    gifs = [src for src in page.images if src.startswith("data:image/gif")]
    assert len(gifs) == 4                                                         # 2 samples + 2 VBench videos
    assert "training curves" in " ".join(page.text).lower()
    head = next(row for row in page.rows if row and row[0] == "run")               # the summary table comes first
    teacher = next(row for row in page.rows if row and row[0] == "teacher")
    assert teacher[head.index("generator/loss")] == "1"                          # final loss: 2 - 0.25 * 4
    assert "temporal_flickering (native)" in head
    # links to every video, relative to the report's folder, and they resolve
    hrefs = re.findall(r"<a href='([^']+)'>", text)
    assert len(hrefs) == 5 and any("swimming" in h for h in hrefs)            # unscored videos are linked too
    for href in hrefs:
        assert not href.startswith("/") and (out.parent / unquote(href)).resolve().is_file()
    # the resolved config and a filled-in protocol
    assert "seed: 11" in text and "max_steps: 4" in text
    protocol = {row[0]: row for row in page.rows if row and row[0] in ("teacher", "videos")}   # later rows win
    assert "11 (samples: 0, 1)" in protocol["teacher"] and "training (teacher)" in protocol["teacher"]
    assert "40, 41" in protocol["videos"] and "native: temporal_flickering" in protocol["videos"]
    assert "-" not in protocol["videos"][4]                                       # the seeds column
    md = out.with_suffix(".md").read_text()
    assert "## Run config (resolved)" in md and md.count(".mp4](") == 5


@pytest.mark.parametrize("content, match", [
    (b"\x89PNG\r\n\x1a\n\xff\xd8", "not valid UTF-8 JSON"),
    (b"{}", "has no metrics, speed or videos to report"),
    (b'{"runs": [{"name": "a", "kind": "toybench", "metrics": ["adherence"]}, {"name": "b"}]}',
     r"run 0 \(a\) has no metrics"),
    (b'{"kind": "vbenchh", "metrics": {"total": 0.8}}', "has kind 'vbenchh'; known kinds: toybench, vbench, training"),
])
def test_a_results_file_that_is_not_one_is_a_clear_error(tmp_path, capsys, content, match):
    bad = tmp_path / "results.json"
    bad.write_bytes(content)
    assert main(["eval", "report", str(bad), "--out", str(tmp_path / "r.html"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and re.search(match, err[0]), err
    assert not (tmp_path / "r.html").exists()


def test_a_curve_of_one_point_is_drawn(tmp_path):
    """A generator updated every 5th step of a short run logs one value: it must show as a mark."""
    import io

    from PIL import Image

    from forcelab.eval.plots import curves_chart

    def blue_pixels(series):
        image = np.asarray(Image.open(io.BytesIO(curves_chart(series))).convert("RGB")).astype(int)
        return int((np.abs(image - np.array([31, 119, 180])).sum(-1) < 40).sum())   # matplotlib's first colour

    assert blue_pixels({"run": {"generator/loss": ([5], [0.5])}}) > 10
    assert blue_pixels({"run": {"generator/loss": ([], [])}}) == 0
