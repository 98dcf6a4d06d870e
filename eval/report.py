"""`forcelab eval report RESULTS... --out report.html`: one self-contained page comparing runs.

    write_report(["a/toybench.json", "b/toybench.json", "vbench/vbench.json"], "report.html")

Writes report.html (every image embedded as base64) and report.md beside it, with: a
summary table (one row per run: each metric's mean +- 95% CI, VBench's total / quality /
semantic, each VBench dimension labelled "(VBench)" when the real toolkit scored it or
"(native)" when forcelab did, speed in frames/s where recorded), bar charts across runs,
training curves, drift charts (metrics per time bucket), frame strips and animated previews
of sample videos, a link to every video, the protocol of each run (mode, prompts, seeds,
samples, versions), each training run's resolved config and the JSON of every number.

A results file is a toybench.json or vbench.json of `forcelab eval`, a training run folder
(its metrics.jsonl gives the curves and final values, its config.yaml the config, its
samples/ the videos; the folder or its metrics.jsonl may be given), or any JSON run record:
{"name", "speed_fps", "metrics": {name: number}, ...} - or {"runs": [records]} / a list of
records / {"runs": {name: record}} for several runs in one file. A record may embed
"toybench" and "vbench" results. Top-level numbers of a record count as metrics.

Paths inside a results file are data: a record's videos_dir (relative: to the results file's
folder) is followed only inside the results file's folder, and video names only inside
videos_dir; anything else is left out, said on stderr and in the report's "Left out" section.
`forcelab eval toybench` and `eval vbench` write their results beside the videos by default.
Links to videos are relative to the report's folder (keep them together when moving them).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import quote


from ..data.video import probe_video, read_video
from ..errors import ForcelabError
from ..progress import progress_bar
from . import plots
from .sidecars import read_sidecar

MARKER = "forcelab eval report"
SAMPLES_PER_RUN = 2
SKIP_NUMBERS = ("bucket_frames", "speed_fps", "seed", "frames", "steps")
KINDS = ("toybench", "vbench", "training")
RUN_LOG = "metrics.jsonl"                 # a training run folder's metrics, one JSON object per line
CURVE_SKIP = ("step", "time", "steps_per_s")


class Run:
    """One row of the report: a label, metric -> (value, ci95 or None), drift series, videos, the raw JSON."""

    def __init__(self, label: str, record: dict, source: Path):
        self.label, self.record, self.source = label, record, source
        self.metrics: dict[str, tuple[float, float | None]] = {}
        self.drift: dict[str, tuple[list, list]] = {}
        self.bucket_frames = 1
        self.videos: list[tuple[Path, float | None, str]] = []   # every video (path, fps, caption); the
        self.notes: list[str] = []                          # first SAMPLES_PER_RUN get previews; what was left out
        self.protocol = None
        self.speed = None
        self.curves: dict[str, tuple[list, list]] = {}      # metric -> (steps, values), training runs
        self.config: str | None = None                      # a training run's resolved config (YAML)
        self._read(record)

    def _read(self, rec: dict) -> None:
        if rec.get("kind") == "toybench":
            self._toybench(rec)
        elif rec.get("kind") == "vbench":
            self._vbench(rec)
        elif rec.get("kind") == "training":
            self._training(rec)
        for key in ("toybench", "vbench"):
            if isinstance(rec.get(key), dict):
                self._read({**rec[key], "kind": key})
        for source in (rec, rec.get("metrics") if isinstance(rec.get("metrics"), dict) else {}):
            for k, v in source.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in SKIP_NUMBERS:
                    self.metrics.setdefault(k, (float(v), None))
        speed = rec.get("speed_fps", (rec.get("generation") or {}).get("speed_fps"))
        if isinstance(speed, (int, float)):
            self.speed = float(speed)

    def _toybench(self, rec: dict) -> None:
        for m, s in rec.get("spread", {}).items():
            if not m.endswith("_drift"):
                self.metrics[m] = (s.get("mean", math.nan), s.get("ci95"))
        for m, b in rec.get("buckets", {}).items():
            if b.get("mean"):
                self.drift[m] = (b["mean"], b.get("std", [0.0] * len(b["mean"])))
        self.bucket_frames = rec.get("bucket_frames", 1) or 1
        rows = [r for r in rec.get("videos", []) if isinstance(r, dict)]
        for row in rows:
            self._sample(rec, row.get("video"), row.get("fps"), row.get("caption") or "")
        per_caption = Counter(r.get("caption") for r in rows)
        self.protocol = {"mode": "ToyBench", "prompts_file": None, "extended_prompts": False,
                         "seeds": sorted({r["seed"] for r in rows if isinstance(r.get("seed"), int)}),
                         "samples_per_prompt": max(per_caption.values()) if per_caption else 0,
                         "prompts": len(per_caption), "videos": len(rows),
                         "versions": {"forcelab": rec["forcelab"]} if rec.get("forcelab") else {}}

    def _videos_folder(self, rec: dict) -> Path | None:
        """The record's videos_dir, if it resolves inside the results file's folder (a relative one
        is relative to that folder). A path recorded in a results file is data, not the user's
        word: one leading elsewhere is not followed, and the report says so (self.notes)."""
        if not isinstance(rec.get("videos_dir"), str) or not rec["videos_dir"] or "\0" in rec["videos_dir"]:
            return None
        home = self.source.parent.resolve()
        folder = (home / rec["videos_dir"]).resolve()
        if folder != home and home not in folder.parents:
            note = (f"results file {self.source}: videos_dir {rec['videos_dir']} is outside the results file's "
                    f"folder; its sample videos are not embedded (put the results file in or above its videos "
                    f"folder)")
            if note not in self.notes:
                self.notes.append(note)
            return None
        return folder

    def _sample(self, rec: dict, name: str, fps, caption: str) -> None:
        """A sample video named in a results file; names never leave its videos_dir, which never
        leaves the results file's folder."""
        folder = self._videos_folder(rec)
        if folder is None or not isinstance(name, str) or "\0" in name:
            return
        path = (folder / name).resolve()
        if folder in path.parents and path.is_file():
            fps = fps or (rec.get("generation") or {}).get("fps")
            self.videos.append((path, float(fps) if fps else None, caption))

    def _vbench(self, rec: dict) -> None:
        agg = rec.get("aggregate") or {}
        for k in ("total", "quality", "semantic"):
            if isinstance(agg.get(k), (int, float)):
                self.metrics[f"vbench_{k}"] = (float(agg[k]), None)
        results = rec.get("results") or {}
        for d, s in (rec.get("scores") or {}).items():
            self.metrics[f"{d} ({vbench_source(results.get(d))})"] = (float(s), None)
        self.protocol = dict(rec.get("protocol") or {})
        sources = {}
        for d in rec.get("scores") or {}:
            sources.setdefault(vbench_source(results.get(d)), []).append(d)
        self.protocol["scored_by"] = sources
        scored = sorted({v for r in results.values() for v in r.get("videos", {})})
        folder = self._videos_folder(rec)      # every video of the run is linked, scored ones first
        others = sorted(p.name for p in folder.glob("*.mp4") if p.name not in scored) if folder else []
        for name in scored + others:
            self._sample(rec, name, None, re.sub(r"-\d+$", "", Path(name).stem))

    def _training(self, rec: dict) -> None:
        """A run folder: curves and final values from metrics.jsonl, config.yaml, samples/."""
        folder = self.source.parent
        rows = []
        for line in (folder / RUN_LOG).read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:        # a run stopped mid-write leaves a partial last line
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
        for row in rows:
            for k, v in row.items():
                if k not in CURVE_SKIP and isinstance(v, (int, float)) and not isinstance(v, bool):
                    steps, values = self.curves.setdefault(k, ([], []))
                    steps.append(row["step"])
                    values.append(float(v))
        final = {k: v[-1] for k, (_, v) in self.curves.items() if k.endswith("loss")}
        rec.update(steps=rows[-1]["step"] if rows else 0, final=final)
        self.metrics.update({k: (v, None) for k, v in final.items()})
        config = folder / "config.yaml"
        self.config = config.read_text(encoding="utf-8") if config.is_file() else None
        seed = re.search(r"^seed:\s*(\S+)", self.config or "", re.M)
        samples = sorted((folder / "samples").glob("step-*/*.mp4"), key=lambda p: (p.parent.name, p.name), reverse=True)
        seeds = set()
        for path in samples:
            side = read_sidecar(path) or {}
            seeds.add(side.get("seed"))
            self._sample({"videos_dir": "."}, str(path.relative_to(folder)), side.get("fps"),
                          f"{path.parent.name}: {side.get('prompt', '')}")
        self.protocol = {"mode": f"training ({rec.get('recipe') or 'recipe in config'})", "prompts_file": None,
                         "seeds": seed.group(1) if seed else "-",
                         "sample_seeds": sorted(s for s in seeds if s is not None),
                         "samples_per_prompt": None, "videos": len(samples),
                         "versions": {"forcelab": rec["forcelab"]} if rec.get("forcelab") else {}}


def vbench_source(result) -> str:
    """Who scored a VBench dimension: "VBench" (the toolkit) or "native" (forcelab's own code)."""
    result = result if isinstance(result, dict) else {}
    return result.get("source") or ("native" if result.get("native") else "VBench")


def training_record(folder: Path) -> dict:
    """The record of a training run folder (what its run file says, plus kind and name)."""
    from ..run_folder import RUN_RECORD

    rec = {"kind": "training", "name": folder.resolve().name}
    run_file = folder / RUN_RECORD
    if run_file.is_file():
        try:
            saved = json.loads(run_file.read_text(encoding="utf-8"))
            rec.update({k: v for k, v in saved.items() if k in ("recipe", "forcelab")})
        except json.JSONDecodeError:
            pass
    return rec


def _checked(run: Run, source: Path, index: int) -> Run:
    """A record of an unknown kind, or one with nothing to report, is not silently an empty row."""
    kind = run.record.get("kind")
    if kind is not None and kind not in KINDS:
        raise ForcelabError(f"results file {source}: run {index} ({run.label}) has kind {kind!r}; known kinds: "
                            f"{', '.join(KINDS)}")
    if not (run.metrics or run.speed is not None or run.videos or run.curves or run.drift):
        raise ForcelabError(f"results file {source}: run {index} ({run.label}) has no metrics, speed or videos "
                            f"to report; give a toybench.json, vbench.json, a training run folder or a record "
                            f"with \"metrics\": {{name: number}}")
    return run


def load_runs(paths) -> list[Run]:
    """Runs from results files (see the module docstring), labelled uniquely."""
    runs = []
    for p in map(Path, paths):
        if p.is_dir() or p.name == RUN_LOG:
            folder = p if p.is_dir() else p.parent
            if not (folder / RUN_LOG).is_file():
                raise ForcelabError(f"results file {p}: a folder without {RUN_LOG} (give a training run folder, "
                                    f"or a toybench.json / vbench.json)")
            runs.append(Run(folder.resolve().name, training_record(folder), folder / RUN_LOG))
            continue
        if not p.is_file():
            raise ForcelabError(f"results file {p}: not found")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:   # JSONDecodeError is a ValueError
            raise ForcelabError(f"results file {p}: not valid UTF-8 JSON ({e}); give a toybench.json, vbench.json, "
                                f"a training run folder or a JSON run record") from None
        if isinstance(data, dict) and isinstance(data.get("runs"), dict):
            records = [{"name": k, **v} for k, v in data["runs"].items()]
        elif isinstance(data, dict) and isinstance(data.get("runs"), list):
            records = data["runs"]
        elif isinstance(data, list):
            records = data
        elif isinstance(data, dict):
            records = [data]
        else:
            raise ForcelabError(f"results file {p}: expected a JSON object or list of run records")
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise ForcelabError(f"results file {p}: run {i} is not a JSON object")
            name = str(rec.get("name") or rec.get("label") or (p.parent.name if p.stem in ("toybench", "vbench")
                                                                 else p.stem))
            runs.append(_checked(Run(name, rec, p), p, i))
    seen: dict[str, int] = {}
    for run in runs:                                   # same names from different folders stay apart
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label} ({seen[run.label]})"
    if not runs:
        raise ForcelabError("no runs in the results files given")
    return runs


def _fmt(value: float | None, ci: float | None = None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    text = f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    return f"{text} ± {ci:.2g}" if ci else text


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def check_writable(path: Path) -> None:
    if path.exists() and MARKER not in path.read_text(encoding="utf-8", errors="replace")[:4096]:
        raise ForcelabError(f"{path} exists and was not written by forcelab eval report; move it or pick another --out")


def write_report(results, out, *, progress: bool = True) -> Path:
    """Render the report of the given results files to `out` (.html) and its .md twin."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ForcelabError(f"--out {out}: give an .html path (the markdown goes beside it)")
    md_path = out.with_suffix(".md")
    check_writable(out)
    check_writable(md_path)
    runs = load_runs(results)
    for note in (n for r in runs for n in r.notes):
        print(f"forcelab eval report: {note}", file=sys.stderr)
    labels = [r.label for r in runs]
    metrics = list(dict.fromkeys(m for r in runs for m in r.metrics))
    images = []                                         # (section, title, mime, bytes)
    if metrics:
        values = {(r.label, m): r.metrics[m][0] for r in runs for m in r.metrics}
        errors = {(r.label, m): r.metrics[m][1] for r in runs for m in r.metrics}
        images.append(("across runs", "metrics across runs (bars: mean, whiskers: 95% CI)", "image/png",
                       plots.bar_chart(metrics, labels, values, errors, "metrics across runs")))
    speeds = {r.label: r.speed for r in runs if r.speed is not None}
    if speeds:
        images.append(("across runs", "speed (frames/s)", "image/png",
                       plots.bar_chart(["speed_fps"], list(speeds), {(k, "speed_fps"): v for k, v in speeds.items()},
                                       {}, "generation speed (frames/s)")))
    curves = {r.label: r.curves for r in runs if r.curves}
    if curves:
        images.append(("training curves", "training curves (metrics.jsonl)", "image/png", plots.curves_chart(curves)))
    drift_metrics = list(dict.fromkeys(m for r in runs for m in r.drift))
    if drift_metrics:
        images.append(("drift", "metrics per time bucket", "image/png",
                       plots.drift_chart(drift_metrics, {r.label: r.drift for r in runs if r.drift},
                                         {r.label: r.bucket_frames for r in runs})))
    samples = []                                        # (run, video name, caption, strip, gif)
    for run in progress_bar(runs, desc="report previews", unit="run", disable=not progress):
        for path, fps, caption in run.videos[:SAMPLES_PER_RUN]:
            frames = read_video(path).permute(0, 2, 3, 1).numpy()
            fps = fps or probe_video(path).fps
            samples.append((run.label, path.name, caption, plots.frame_strip(frames), plots.animation(frames, fps)))

    out.parent.mkdir(parents=True, exist_ok=True)
    links = {r.label: [(_href(path, out.parent), path.name, caption) for path, _, caption in r.videos] for r in runs}
    out.write_text(_html(runs, metrics, images, samples, links), encoding="utf-8")
    md_path.write_text(_markdown(runs, metrics, images, samples, links), encoding="utf-8")
    return out


def _href(path: Path, folder: Path) -> str:
    """A link to `path` from a page in `folder`: relative, URL-quoted."""
    return quote(Path(os.path.relpath(path, folder.resolve())).as_posix())


def _summary_rows(runs, metrics):
    head = ["run", *metrics, "speed (frames/s)"]
    rows = [[r.label, *(_fmt(*r.metrics[m]) if m in r.metrics else "-" for m in metrics), _fmt(r.speed)]
            for r in runs]
    return head, rows


def _protocol_rows(runs):
    def text(value):
        if value is None or value == [] or value == {}:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, list):
            return ", ".join(map(str, value))
        return str(value)

    rows = []
    for r in runs:
        p = r.protocol or {}
        gen = r.record.get("generation") or {}
        seeds = p.get("seeds")
        if p.get("sample_seeds"):
            seeds = f"{text(seeds)} (samples: {text(p['sample_seeds'])})"
        scored = "; ".join(f"{who}: {', '.join(dims)}" for who, dims in (p.get("scored_by") or {}).items())
        versions = p.get("versions") or ({"forcelab": r.record["forcelab"]} if r.record.get("forcelab") else {})
        rows.append([r.label, text(p.get("mode", r.record.get("kind"))), text(p.get("prompts_file")),
                     text(p.get("extended_prompts")), text(seeds),
                     text(p.get("samples_per_prompt", gen.get("samples"))), text(p.get("videos")),
                     scored or "-",
                     ", ".join(f"{k} {v}" for k, v in versions.items() if not k.endswith("_file")) or "-"])
    return ["run", "mode", "prompts file", "extended", "seeds", "samples/prompt", "videos", "VBench scored by",
            "versions"], rows


def _html(runs, metrics, images, samples, links) -> str:
    e = html.escape

    def table(head, rows):
        return ("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>"
                + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
                + "</tbody></table>")

    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><meta name='generator' content='{MARKER}'>",
             "<title>forcelab evaluation report</title><style>",
             "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}"
             "pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}.sample{margin:1em 0}"
             ".row{display:flex;gap:16px;align-items:flex-start}.row img{max-width:75%}",
             "</style></head><body>", "<h1>forcelab evaluation report</h1>",
             f"<p>{len(runs)} run(s): " + ", ".join(e(r.label) for r in runs) + "</p>",
             "<h2>Summary</h2>", table(*_summary_rows(runs, metrics)),
             "<p>Each metric is oriented so that higher is better (ToyBench: ground truth at or near its "
             "best); ± is the 95% confidence half-width over videos. Drift (per time bucket) is charted "
             "below; its per-video *_drift values are in the JSON. A VBench dimension is marked (VBench) when "
             "the VBench toolkit scored it, (native) when forcelab's own implementation did; the Protocol "
             "table lists which.</p>"]
    section = None
    for sec, title, mime, data in images:
        if sec != section:
            parts.append(f"<h2>{e(sec.capitalize())}</h2>")
            section = sec
        parts.append(f"<figure><img alt='{e(title)}' src='data:{mime};base64,{_b64(data)}'>"
                     f"<figcaption>{e(title)}</figcaption></figure>")
    if samples:
        parts.append("<h2>Sample videos</h2>")
        for label, name, caption, strip, gif in samples:
            parts.append(f"<div class='sample'><h3>{e(label)}: {e(name)}</h3><p>{e(caption)}</p>"
                         f"<div class='row'><img alt='frames of {e(name)}' src='data:image/png;base64,{_b64(strip)}'>"
                         f"<img alt='animation of {e(name)}' src='data:image/gif;base64,{_b64(gif)}'></div></div>")
    if any(links.values()):
        parts.append("<h2>Videos</h2>")
        for label, rows in links.items():
            if rows:
                parts.append(f"<details><summary>{e(label)}: {len(rows)} video(s)</summary><ul>"
                             + "".join(f"<li><a href='{e(href)}'>{e(name)}</a> {e(caption)}</li>"
                                       for href, name, caption in rows) + "</ul></details>")
    notes = [n for r in runs for n in r.notes]
    if notes:
        parts.append("<h2>Left out</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    parts += ["<h2>Protocol</h2>", table(*_protocol_rows(runs))]
    configs = [r for r in runs if r.config]
    if configs:
        parts.append("<h2>Run config (resolved)</h2>")
        parts += [f"<details open><summary>{e(r.label)}</summary><pre>{e(r.config)}</pre></details>" for r in configs]
    parts.append("<h2>All numbers (JSON)</h2>")
    for r in runs:
        parts.append(f"<details><summary>{e(r.label)} ({e(str(r.source))})</summary><pre>"
                     f"{e(json.dumps(r.record, indent=2))}</pre></details>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _markdown(runs, metrics, images, samples, links) -> str:
    def table(head, rows):
        esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
        return "\n".join(["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head),
                          *("| " + " | ".join(map(esc, row)) + " |" for row in rows)])

    parts = [f"<!-- {MARKER} -->", "# forcelab evaluation report", "",
             f"{len(runs)} run(s): " + ", ".join(r.label for r in runs), "", "## Summary", "",
             table(*_summary_rows(runs, metrics)), ""]
    for _, title, mime, data in images:
        parts += [f"### {title}", "", f"![{title}](data:{mime};base64,{_b64(data)})", ""]
    if samples:
        parts += ["## Sample videos", ""]
        for label, name, caption, strip, gif in samples:
            parts += [f"### {label}: {name}", "", caption, "", f"![frames](data:image/png;base64,{_b64(strip)})", "",
                      f"![animation](data:image/gif;base64,{_b64(gif)})", ""]
    if any(links.values()):
        parts += ["## Videos", ""]
        for label, rows in links.items():
            parts += [f"- {label}: " + ", ".join(f"[{name}]({href})" for href, name, _ in rows)] if rows else []
        parts.append("")
    notes = [n for r in runs for n in r.notes]
    if notes:
        parts += ["## Left out", "", *(f"- {n}" for n in notes), ""]
    parts += ["## Protocol", "", table(*_protocol_rows(runs)), ""]
    configs = [r for r in runs if r.config]
    if configs:
        parts += ["## Run config (resolved)", ""]
        for r in configs:
            parts += [f"### {r.label}", "", "```yaml", r.config.rstrip(), "```", ""]
    parts += ["## All numbers (JSON)", ""]
    for r in runs:
        parts += [f"### {r.label}", "", "```json", json.dumps(r.record, indent=2), "```", ""]
    return "\n".join(parts)
