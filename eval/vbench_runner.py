"""`forcelab eval vbench`: run VBench in its own Python, one dimension at a time, resumably.

    forcelab eval vbench VIDEOS_DIR --vbench-python ~/vbench-env/bin/python \
        [--dimensions subject_consistency dynamic_degree] [--long] [--vbench-cache DIR] [--out DIR]

OUT (default VIDEOS_DIR) receives vbench.json, beside the videos as toybench.json is, so a
report embeds their previews (it follows no path out of a results file's folder); VBench's
own files go to OUT/vbench/. Each dimension is one subprocess (vbench_driver.py in VBench's
environment; its log in OUT/vbench/logs/). It writes OUT/vbench/{dimension}_eval_results.json
atomically, so a dimension with a result for the same videos ({dimension}_info.json) is
finished: re-running the same command skips it and retries only the ones that failed; changed
videos are scored again.
Weights: VBench runs in its local mode, reading every model from one cache folder
(--vbench-cache, else $VBENCH_CACHE_DIR, else ~/.cache/vbench; WEIGHTS lists the files per
dimension; torch's hub cache, which DINO loads through, is its torch/ subfolder). They are
checked before anything runs, so an offline machine is told every
missing file by name and where to get it, instead of VBench failing on a download mid-run.
The videos are found by prompt: a prompt of the VBench suite is scored on the dimensions
the suite lists for it (the standard protocol, with its auxiliary info); any
other prompt on the dimensions that need no suite metadata (VBench's custom_input rule).
Prompts come from the sidecars of `forcelab generate`, else from the file name
("{prompt}-{i}.mp4"). --long scores VBench-Long clips (vbench_long.py) and averages each
long video's clips. OUT/vbench.json holds the scores (each marked native or VBench), the
official aggregate and the protocol: prompts file, extended or not, seeds, samples per prompt,
mode and versions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path


from .. import __version__
from ..errors import ForcelabError
from ..progress import progress_bar
from . import vbench as vb
from .sidecars import check_writable, generation, read_sidecar
from ..generate.vbench_suite import full_info
from .vbench_long import clip_seconds, split_video

DRIVER = Path(__file__).resolve().parent / "vbench_driver.py"
WORK = "vbench"              # OUT/WORK/: VBench's per-dimension files, logs, clips
CLIP_B32 = ("clip_model/ViT-B-32.pt", "https://openaipublic.azureedge.net/clip/models/"
            "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt")
GRIT = ("grit_model/grit_b_densecap_objectdet.pth",
        "https://huggingface.co/OpenGVLab/VBench_Used_Models/resolve/main/grit_b_densecap_objectdet.pth")
TORCH_HOME = "torch"          # the VBench subprocess's TORCH_HOME, inside the cache folder
DINO_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"
VICLIP = ("ViCLIP/ViClip-InternVid-10M-FLT.pth",
          "https://huggingface.co/OpenGVLab/VBench_Used_Models/resolve/main/ViClip-InternVid-10M-FLT.pth")
# What VBench 0.1.5 reads from its cache folder in local mode, per dimension: (file relative to
# the folder, where to get it). temporal_flickering needs no model. GRiT and Tag2Text also load
# the tokenizer bert-base-uncased through transformers (the Hugging Face cache, HF_HOME).
WEIGHTS = {
    # DINO's hub entry loads its weights through torch's hub cache (TORCH_HOME, which the runner
    # points inside the folder), VBench checks its own copy: the same file, twice (a link will do)
    "subject_consistency": (("dino_model/facebookresearch_dino_main/hubconf.py",
                             "git clone https://github.com/facebookresearch/dino"),
                            ("dino_model/dino_vitbase16_pretrain.pth", DINO_URL),
                            (f"{TORCH_HOME}/hub/checkpoints/dino_vitbase16_pretrain.pth", DINO_URL)),
    "background_consistency": (CLIP_B32,),
    "motion_smoothness": (("amt_model/amt-s.pth", "https://huggingface.co/lalala125/AMT/resolve/main/amt-s.pth"),),
    "dynamic_degree": (("raft_model/models/raft-things.pth",
                        "models.zip from https://dl.dropboxusercontent.com/s/4j4z58wuv8o0mfz/models.zip, unzipped"),),
    "aesthetic_quality": (("clip_model/ViT-L-14.pt", "https://openaipublic.azureedge.net/clip/models/"
                           "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt"),
                          ("aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth", "https://raw.githubusercontent."
                           "com/LAION-AI/aesthetic-predictor/main/sa_0_4_vit_l_14_linear.pth")),
    "imaging_quality": (("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth", "https://github.com/chaofengc/IQA-PyTorch/"
                         "releases/download/v0.1-weights/musiq_spaq_ckpt-358bb6af.pth"),),
    "object_class": (GRIT,), "multiple_objects": (GRIT,), "color": (GRIT,), "spatial_relationship": (GRIT,),
    "human_action": (("umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth", "https://huggingface.co/OpenGVLab/"
                      "VBench_Used_Models/resolve/main/l16_ptk710_ftk710_ftk400_f16_res224.pth"),),
    "scene": (("caption_model/tag2text_swin_14m.pth",
               "https://huggingface.co/spaces/xinyu1205/recognize-anything/resolve/main/tag2text_swin_14m.pth"),),
    "appearance_style": (CLIP_B32,),
    "temporal_style": (VICLIP,), "overall_consistency": (VICLIP,),
}
PROBE_TIMEOUT_S = 300        # importing VBench (torch, transformers) can take a while on a cold disk
MUSIQ_SCALE = 100.0          # VBench reports imaging_quality (MUSIQ) in 0..100; the leaderboard in 0..1


class VBenchRunError(ForcelabError):
    """A dimension failed inside VBench (its log says why); finished ones are kept."""


def prompt_of(name: str) -> str:
    """VBench's rule: the file stem without a trailing "-<digits>" sample index."""
    return re.sub(r"-\d+$", "", Path(name).stem)


def check_python(python: str | os.PathLike) -> dict:
    """Versions {vbench, torch, python} from VBench's interpreter, or a clear error."""
    p = Path(python).expanduser()
    if not p.exists():
        raise ForcelabError(f"--vbench-python {python}: not found; give the python of an environment "
                            f"where VBench is installed (e.g. ~/vbench-env/bin/python)")
    if not p.is_file() or not os.access(p, os.X_OK):
        raise ForcelabError(f"--vbench-python {python}: not an executable file; give the python "
                            f"interpreter itself (…/bin/python), not its folder")
    try:
        done = subprocess.run([str(p), str(DRIVER), "probe"], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ForcelabError(f"--vbench-python {python}: cannot run it ({e})") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ForcelabError(f"--vbench-python {python}: cannot import vbench there ({last}); install it "
                            f"in that environment (pip install vbench) or point to the right python")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        raise ForcelabError(f"--vbench-python {python}: unexpected probe output {lines[-1]!r}") from None


def read_results(path: Path, dimension: str) -> tuple[float, list[dict]]:
    """(mean, per-video rows) from a VBench {name}_eval_results.json, checked."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        mean, rows = data[dimension][0], data[dimension][1]
        mean = float(mean)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ForcelabError(f"{path}: not a VBench result for {dimension} ({type(e).__name__}: {e}); "
                            f"delete it to re-run that dimension") from None
    rows = [r for r in rows if isinstance(r, dict) and "video_path" in r]
    return mean, rows


def _scale(dimension: str, value: float) -> float:
    return value / MUSIQ_SCALE if dimension == "imaging_quality" and value > 1.0 else value


def plan_dimension(dimension: str, groups: dict[str, list[str]]) -> list[dict]:
    """VBench full-info entries for one dimension: {prompt: video paths} -> [{prompt_en,
    dimension, video_list, auxiliary_info?}] following the standard or the custom rule."""
    suite = {}
    for row in full_info():
        suite.setdefault(row["prompt_en"], row)
    entries = []
    for prompt, videos in groups.items():
        row = suite.get(prompt)
        if row is not None:
            if dimension not in row["dimension"]:
                continue
            entry = {"prompt_en": prompt, "dimension": [dimension], "video_list": videos}
            if dimension in row.get("auxiliary_info", {}):
                entry["auxiliary_info"] = {dimension: row["auxiliary_info"][dimension]}
            entries.append(entry)
        elif dimension not in vb.NEEDS_SUITE:
            entries.append({"prompt_en": prompt, "dimension": [dimension], "video_list": videos})
    return entries


def protocol(videos: list[Path], sidecars: dict[str, dict], long: bool, versions: dict) -> dict:
    """What every VBench number depends on, from the generation sidecars."""
    sides = [sidecars[v.name] for v in videos if v.name in sidecars]
    suites = [s["vbench_suite"] for s in sides if s.get("vbench_suite")]
    per_prompt = defaultdict(int)
    for v in videos:
        per_prompt[sidecars.get(v.name, {}).get("prompt", prompt_of(v.name))] += 1
    extended = any(s.get("prompt_text", s.get("prompt")) != s.get("prompt") for s in sides)
    return {"mode": "VBench-Long" if long else "VBench",
            "prompts_file": suites[0]["prompts_file"] if suites else None,
            "prompt_suite": suites[0] if suites else None,
            "extended_prompts": bool(extended or any(s.get("extended") for s in suites)),
            "seeds": sorted({s["seed"] for s in sides if "seed" in s}),
            "samples_per_prompt": max(per_prompt.values()) if per_prompt else 0,
            "prompts": len(per_prompt), "videos": len(videos), "sidecars": len(sides),
            "versions": versions}


def weights_folder(cache=None) -> Path:
    """VBench's cache folder: `cache` (--vbench-cache), else $VBENCH_CACHE_DIR, else VBench's
    own default ~/.cache/vbench. The driver gets it as VBENCH_CACHE_DIR."""
    if cache is not None:
        folder = Path(cache).expanduser()
        if not folder.is_dir():
            raise ForcelabError(f"--vbench-cache {cache}: not a folder (VBench's weights go there; see "
                                f"forcelab.eval.vbench_runner.WEIGHTS for the files)")
        return folder
    env = os.environ.get("VBENCH_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vbench"


def check_weights(folder: Path, dimensions) -> None:
    """Every file the dimensions need (WEIGHTS) is in `folder`, else one error naming each
    missing file, the dimensions that need it and where to get it."""
    missing: dict[str, tuple[str, list[str]]] = {}
    for d in dimensions:
        for rel, source in WEIGHTS.get(d, ()):
            if not (folder / rel).is_file():
                missing.setdefault(rel, (source, []))[1].append(d)
    if missing:
        files = "; ".join(f"{folder / rel} for {', '.join(dims)} (from {source})"
                          for rel, (source, dims) in missing.items())
        raise ForcelabError(f"VBench weights missing ({len(missing)} file(s)): {files}. Put them there (VBench "
                            f"reads its models from this folder only: --vbench-cache, else $VBENCH_CACHE_DIR, else "
                            f"~/.cache/vbench), or leave those dimensions out with --dimensions")


def run_vbench(videos_dir, out_dir=None, *, python=None, dimensions=None, long: bool = False, cache=None,
               device: str = "cuda", native_flickering: bool = False, progress: bool = True) -> dict:
    """Score VIDEOS_DIR on `dimensions` (default all 16); returns and writes OUT/vbench.json
    (OUT defaults to VIDEOS_DIR; VBench's own files go to OUT/vbench/)."""
    videos_dir = Path(videos_dir)
    if not videos_dir.is_dir():
        raise ForcelabError(f"{videos_dir}: not a folder of videos")
    videos = sorted(videos_dir.glob("*.mp4"))
    if not videos:
        raise ForcelabError(f"{videos_dir}: no .mp4 videos (generate them with `forcelab generate --vbench`)")
    out = Path(out_dir) if out_dir else videos_dir
    work = out / WORK
    work.mkdir(parents=True, exist_ok=True)
    check_writable(out / "vbench.json", "vbench")
    dims = vb.check_dimensions(dimensions or vb.DIMENSIONS)
    native = [d for d in dims if native_flickering and d in vb.NATIVE]
    external = [d for d in dims if d not in native]
    versions = {"forcelab": __version__, "python": sys.version.split()[0]}
    if external:
        if python is None:
            raise ForcelabError(f"--vbench-python is needed for {external} (only temporal_flickering runs "
                                f"without VBench, with --native-flickering)")
        cache = weights_folder(cache)
        versions.update({f"vbench_env_{k}": v for k, v in check_python(python).items()})
    sidecars = {v.name: side for v in videos if (side := read_sidecar(v)) is not None}
    plans, skipped = _plan_dimensions(dims, videos, sidecars, long, work)
    todo = [d for d, (entries, _) in plans.items()
            if not _finished(work / f"{d}_eval_results.json", work / f"{d}_info.json", entries)]
    if external:
        check_weights(cache, [d for d in todo if d in external])

    results, failed = {}, {}
    bar = progress_bar(list(plans), desc="vbench", unit="dim", disable=not progress)
    for dim in bar:
        bar.set_postfix_str(dim)
        entries, source_of = plans[dim]
        result_file, info = work / f"{dim}_eval_results.json", work / f"{dim}_info.json"
        if dim in todo:
            info.write_text(json.dumps(entries, indent=2), encoding="utf-8")
            if dim in native:
                paths = [p for e in entries for p in e["video_list"]]
                mean, rows = vb.temporal_flickering_files(paths)
                result_file.write_text(json.dumps({dim: [mean, rows]}, indent=4), encoding="utf-8")
            else:
                ok = _run_driver(python, info, dim, work, device, cache)
                if not ok or not result_file.is_file():
                    failed[dim] = str(work / "logs" / f"{dim}.log")
                    continue
        results[dim] = _dimension_result(dim, result_file, source_of, long, dim in native)
    bar.close()

    scores = {d: r["score"] for d, r in results.items()}
    summary = {"kind": "vbench", "name": videos_dir.resolve().name, "videos_dir": _recorded(videos_dir, out),
               "dimensions": dims, "scores": scores, "aggregate": vb.aggregate(scores) if scores else None,
               "results": results, "failed": failed, "skipped_no_videos": skipped,
               "protocol": protocol(videos, sidecars, long, versions),
               "notes": {"temporal_flickering": ("native" if native else "VBench") + ", on the videos as given "
                                                 "(VBench's static filter, which needs RAFT, is not applied)",
                         "long_consistency_fusion": "not applied (in-clip scores only)" if long else None},
               "generation": generation(list(sidecars.values()))}
    (out / "vbench.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if not results and not failed:
        raise ForcelabError(f"no VBench dimension scored: the videos' prompts belong to none of {skipped} (the suite "
                            f"scores each prompt on its own dimensions; a custom prompt skips {list(vb.NEEDS_SUITE)})")
    if failed:
        raise VBenchRunError(f"VBench failed on {sorted(failed)} (logs: {work / 'logs'}); the other dimensions "
                             f"are in {out / 'vbench.json'}. Fix the cause and run the same command again: "
                             f"finished dimensions are not re-run")
    return summary


def _plan_dimensions(dims: list[str], videos: list[Path], sidecars: dict, long: bool,
                     work: Path) -> tuple[dict, list[str]]:
    """dimension -> (VBench entries, scored file -> its video's name), and the dimensions none
    of the videos' prompts belong to. long: each video is scored as the dimension's clips."""
    plans, skipped = {}, []
    for dim in dims:
        source_of = {}
        groups = defaultdict(list)
        for v in videos:
            prompt = sidecars.get(v.name, {}).get("prompt", prompt_of(v.name))
            if long:
                clips = split_video(v, work / "clips" / f"{clip_seconds(dim)}s", clip_seconds(dim))
                for c in clips:
                    source_of[str(c.resolve())] = v.name
                groups[prompt] += [str(c.resolve()) for c in clips]
            else:
                source_of[str(v.resolve())] = v.name
                groups[prompt].append(str(v.resolve()))
        entries = plan_dimension(dim, groups)
        if entries:
            plans[dim] = (entries, source_of)
        else:
            skipped.append(dim)
    return plans, skipped


def _dimension_result(dim: str, result_file: Path, source_of: dict, long: bool, native: bool) -> dict:
    """One dimension's entry of vbench.json from its results file: the run's score and each video's."""
    mean, rows = read_results(result_file, dim)
    per_video = defaultdict(list)                    # video file -> its scores (one per clip when long)
    for r in rows:
        if isinstance(r.get("video_results"), (int, float)):   # bool too (dynamic_degree)
            path = Path(r["video_path"])
            per_video[source_of.get(str(path.resolve()), path.name)].append(float(r["video_results"]))
    video_scores = {k: sum(v) / len(v) for k, v in per_video.items()}
    if long and video_scores:   # VBench-Long: a long video scores the mean of its clips, the run the mean of those
        mean = sum(video_scores.values()) / len(video_scores)
    return {"score": _scale(dim, mean), "raw": mean, "native": native,
            "source": "native" if native else "VBench",
            "videos": {k: _scale(dim, s) for k, s in video_scores.items()}}


def _recorded(videos_dir: Path, out: Path) -> str:
    """videos_dir as vbench.json records it: relative to OUT when inside it (the default: ".")
    so the results travel with their videos; else absolute (a report then shows no previews)."""
    videos, home = videos_dir.resolve(), out.resolve()
    return os.path.relpath(videos, home) if videos == home or home in videos.parents else str(videos)


def _finished(result_file: Path, info: Path, entries: list[dict]) -> bool:
    """A dimension is done when its result exists for the same videos (its info file, which
    this runner writes first, lists them); a result of unknown origin is never overwritten."""
    if not result_file.is_file():
        return False
    if not info.is_file():
        raise ForcelabError(f"{result_file} exists but was not written by forcelab eval vbench (no {info.name} "
                            f"beside it); move it or pick another --out")
    try:
        return json.loads(info.read_text(encoding="utf-8")) == entries
    except json.JSONDecodeError:
        return False


def _run_driver(python, info: Path, dim: str, out: Path, device: str, cache: Path) -> bool:
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    env = dict(os.environ, VBENCH_CACHE_DIR=str(cache.resolve()), TORCH_HOME=str((cache / TORCH_HOME).resolve()))
    cmd = [str(Path(python).expanduser()), str(DRIVER), "run", "--info", str(info.resolve()), "--dimension", dim,
           "--output", str(out.resolve()), "--device", device]
    with open(logs / f"{dim}.log", "w", encoding="utf-8") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(out.resolve()), env=env)
    return done.returncode == 0
