"""`forcelab generate`: prompts -> mp4 videos (PyAV, libx264), each with a JSON sidecar.

    forcelab generate CKPT --prompt "a red ball bouncing" --plan chunkwise --steps 4
    forcelab generate CKPT --prompts prompts.txt --samples 5 --vbench --output out/vbench
    forcelab generate CKPT --prompt "a red ball" --switch "8:a blue ball" --window 6 --sink 2
    forcelab generate CKPT --prompt "a red ball" --image first.png          # image-to-video
    forcelab generate CKPT --prompt "a red ball" --video clip.mp4 --prefix-frames 9   # extension

CKPT is a DiT checkpoint directory (save_pretrained, original Wan or diffusers) or a Wan
diffusers pipeline folder (transformer/, vae/, text_encoder/, tokenizer/). The encoders
come from --vae / --text-encoder ("toy" or a directory), else from the pipeline folder.
Frame counts are video frames; switch points are video frames at chunk boundaries.
--image / --video: the given frames are encoded and committed to the cache first, and the
video (--frames in all, prefix included) continues them; see models/prefix.py.
Every input is checked before the DiT's weights are loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import time
from pathlib import Path

import torch

from ..config import DTYPES
from ..errors import CheckpointError, ForcelabError
from ..fsio import atomic_path, check_output_dir, clean_stale, read_text, write_text_atomic
from ..validate import (arg, finite_float, fits_memory, in_range, non_negative_int, parse_device, positive_float,
                        positive_int)
from .plans import PLANS, Chunkwise, Rolling, StepMatrix, Teacher, default_timesteps, warp_timesteps
from .rollout import Noise, Switch, cache_options, stream
from .schedule import NUM_TRAIN_TIMESTEPS, SOLVERS

TOY_SIZE, WAN_SIZE = (32, 32), (480, 832)   # default pixel sizes for the toy codec / the Wan VAE
MAX_NAME_BYTES = 255
DEFAULT_LATENT_FRAMES = 21                  # Wan's 81-frame clip (rounded up to whole chunks)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="DiT checkpoint directory, or a Wan diffusers pipeline folder")
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--prompts", help="a text file, one prompt per line (blank lines skipped)")
    g.add_argument("--extended-prompts", help="line-aligned with --prompts: condition on these, "
                   "name the files by --prompts (VBench with extended prompts)")
    g.add_argument("--vbench-prompts", metavar="all|DIM,DIM", default=None,
                   help="the bundled VBench suite: all 946 prompts or those of the listed dimensions "
                   "(implies --vbench naming; pair with --samples 5 and --seed for the standard protocol)")
    g.add_argument("--vbench-extended", action="store_true",
                   help="with --vbench-prompts: condition on the Wan2.1-extended prompts (files keep the originals' names)")
    g.add_argument("--negative-prompt", default="", help="the teacher's unconditional prompt")
    g.add_argument("--switch", action="append", default=[], metavar="FRAME:PROMPT",
                   help="from video frame FRAME on, condition on PROMPT (repeatable)")
    g.add_argument("--switch-mode", choices=("recache", "flush", "keep"), default="recache",
                   help="recache: rebuild the KV cache with the new prompt (LongLive); flush: keep "
                   "sink + last frame (Infinity-RoPE); keep: only the cross-attention changes")
    g.add_argument("--recache-frames", type=arg(non_negative_int), default=None,
                   help="latent frames re-run at a switch")
    g.add_argument("--rope-jump", type=arg(non_negative_int), default=0, help="temporal RoPE cut at each switch (positions)")
    g = p.add_argument_group("plan")
    g.add_argument("--plan", choices=PLANS, default="chunkwise")
    g.add_argument("--steps", default=None, help="number of steps, or a denoising list like "
                   "1000,750,500,250 (warped by --shift); default 4 (teacher: 50)")
    g.add_argument("--shift", type=arg(positive_float), default=5.0, help="sigma shift")
    g.add_argument("--guidance", type=arg(finite_float), default=None, help="teacher CFG scale (default 5): "
                   "uncond + guidance * (cond - uncond)")
    g.add_argument("--solver", choices=SOLVERS, default="unipc", help="teacher ODE solver")
    g.add_argument("--chunk", type=arg(positive_int), default=None, help="latent frames per chunk (default: the model's)")
    g.add_argument("--window", type=arg(non_negative_int), default=None, help="attention window in latent frames (0: none)")
    g.add_argument("--sink", type=arg(non_negative_int), default=None, help="attention sink in latent frames")
    g.add_argument("--ar-step", type=arg(non_negative_int), default=1, help="step_matrix: levels between blocks")
    g.add_argument("--block", type=arg(positive_int), default=None, help="step_matrix: latent frames per block")
    g.add_argument("--segment", type=arg(positive_int), default=None, help="step_matrix: latent frames per segment")
    g.add_argument("--context-noise", type=arg(in_range, 0, NUM_TRAIN_TIMESTEPS - 1), default=0.0, help="timestep of the commit pass")
    g.add_argument("--update", choices=("renoise", "euler"), default=None,
                   help="how a frame reaches its next level (default: renoise; step_matrix: euler)")
    g = p.add_argument_group("video")
    g.add_argument("--frames", type=arg(positive_int), default=None, help="video frames (default: 21 latent frames, 81 with the Wan VAE)")
    g.add_argument("--height", type=arg(positive_int), default=None, help="pixels (default 32 toy, 480 Wan)")
    g.add_argument("--width", type=arg(positive_int), default=None, help="pixels (default 32 toy, 832 Wan)")
    g.add_argument("--fps", type=arg(positive_float), default=16.0)
    g.add_argument("--seed", type=arg(non_negative_int), default=0, help="sample i of every prompt uses seed + i")
    g.add_argument("--samples", type=arg(positive_int), default=1, help="videos per prompt")
    g.add_argument("--batch", type=arg(positive_int), default=1, help="videos generated together")
    g = p.add_argument_group("output and hardware")
    g.add_argument("--output", default="outputs/generate", help="folder for the mp4s and sidecars (default: outputs/generate)")
    g.add_argument("--overwrite", action="store_true", help="replace videos of an earlier forcelab run "
                   "with the same names in --output (default: refuse); other files are never replaced")
    g.add_argument("--vbench", action="store_true", help="name files {prompt}-{i}.mp4 as VBench expects")
    g.add_argument("--vae", default=None, help='"toy" or a directory (default: the model folder\'s vae/)')
    g.add_argument("--text-encoder", default=None, help='"toy" or a directory (default: the model folder\'s text_encoder/)')
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="DiT dtype (default: bf16 on cuda, else fp32)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    from .prefix import add_prefix_arguments
    add_prefix_arguments(p)


# ---------------------------------------------------------------------- checks (no work yet)
def read_prompts(args) -> tuple[list[str], list[str]]:
    """-> (names, texts): names go into file names, texts condition the model."""
    if getattr(args, "vbench_prompts", None):
        if args.prompt or args.prompts or args.extended_prompts:
            raise ForcelabError("--vbench-prompts replaces --prompt/--prompts/--extended-prompts: give one or the other")
        from ..eval.vbench_prompts import parse_dimension_list, select_prompts
        names, texts, args.vbench_suite = select_prompts(parse_dimension_list(args.vbench_prompts),
                                                         extended=args.vbench_extended)
        args.vbench = True
        return names, texts
    if getattr(args, "vbench_extended", False):
        raise ForcelabError("--vbench-extended goes with --vbench-prompts")
    names = list(args.prompt)
    if args.prompts:
        names += _read_lines(args.prompts, "--prompts")
    if not names:
        raise ForcelabError("no prompt: give --prompt TEXT or --prompts FILE")
    texts = names
    if args.extended_prompts:
        if not args.prompts or args.prompt:
            raise ForcelabError("--extended-prompts goes with --prompts (and no --prompt): the lines pair up")
        texts = _read_lines(args.extended_prompts, "--extended-prompts")
        if len(texts) != len(names):
            raise ForcelabError(f"--extended-prompts has {len(texts)} prompts, --prompts {len(names)}; "
                                f"they must be line-aligned")
    return names, texts


def _read_lines(path, flag) -> list[str]:
    return [line.strip() for line in read_text(path, flag).splitlines() if line.strip()]


def parse_switches(items: list[str]) -> list[tuple[int, str]]:
    out = []
    for item in items:
        frame, sep, prompt = item.partition(":")
        if not sep or not prompt.strip():
            raise ForcelabError(f"--switch {item!r}: write FRAME:PROMPT, e.g. --switch '48:a cat jumps'")
        out.append((positive_int(frame, f"--switch {item!r}: FRAME"), prompt.strip()))
    return out


def parse_steps(text: str | None, plan: str) -> int | list[float]:
    if text is None:
        return 50 if plan == "teacher" else 4
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ForcelabError(f"--steps {text!r}: give a number of steps or a list like 1000,750,500,250") from None
    if any(not math.isfinite(v) for v in values) or not values:
        raise ForcelabError(f"--steps {text!r}: give a number of steps or a list like 1000,750,500,250")
    if len(values) == 1 and "," not in str(text) and values[0].is_integer():
        return int(in_range(values[0], "--steps", 1, NUM_TRAIN_TIMESTEPS, integer=True,
                            why=f"the schedule has {NUM_TRAIN_TIMESTEPS} timesteps"))
    if plan == "teacher":
        raise ForcelabError("--steps: the teacher takes a number of solver steps, not a list")
    for v in values:
        in_range(v, "--steps: every timestep", 0, NUM_TRAIN_TIMESTEPS)
    return values


def build_plan(args):
    steps = parse_steps(args.steps, args.plan)
    if args.plan == "teacher":
        for flag, value in (("--chunk", args.chunk), ("--window", args.window), ("--sink", args.sink),
                            ("--block", args.block), ("--segment", args.segment), ("--update", args.update)):
            if value is not None:
                raise ForcelabError(f"{flag} does not apply to the teacher plan (bidirectional, whole clip)")
        return Teacher(steps=steps, shift=args.shift, solver=args.solver,
                       guidance=5.0 if args.guidance is None else args.guidance)
    if args.guidance is not None:
        raise ForcelabError(f"--guidance applies to the teacher plan only ({args.plan} runs the student without CFG)")
    timesteps = default_timesteps(steps, args.shift) if isinstance(steps, int) else warp_timesteps(steps, args.shift)
    common = dict(timesteps=timesteps, chunk_frames=args.chunk, window_frames=args.window,
                  sink_frames=args.sink, context_noise=args.context_noise)
    if args.update:
        common["update"] = args.update
    if args.plan == "step_matrix":
        return StepMatrix(ar_step=args.ar_step, block_frames=args.block, segment_frames=args.segment, **common)
    if args.block is not None or args.segment is not None:
        raise ForcelabError("--block and --segment apply to the step_matrix plan only")
    return (Chunkwise if args.plan == "chunkwise" else Rolling)(**common)


def resolve_model(path: str) -> tuple[Path, list[Path]]:
    """-> (DiT directory, folders to look in for encoders). A forcelab run folder or one of
    its checkpoints gives the generator (its EMA when kept)."""
    from .run_folder import is_run, resolve_weights

    p = Path(path).expanduser()
    if not p.exists():
        raise ForcelabError(f"model {path}: not found")
    if is_run(p):
        return resolve_weights(p, "generator"), []
    if p.is_file():
        raise ForcelabError(f"model {path}: a file; give a checkpoint directory (config.json + safetensors, "
                            f"written by save_pretrained). Loading training checkpoints is not supported yet: "
                            f"export the generator with save_pretrained first")
    if (p / "transformer" / "config.json").is_file():
        return p / "transformer", [p]
    if not (p / "config.json").is_file():
        raise ForcelabError(f"model {path}: no config.json - not a DiT checkpoint directory (save_pretrained, "
                            f"Wan or diffusers format). Training checkpoints are not supported yet: export the "
                            f"generator with save_pretrained first")
    return p, [p, p.parent]


def resolve_encoder(flag_value: str | None, folders: list[Path], sub: str, flag: str, hint: str,
                    recorded: str | None = None) -> str:
    """The flag's value, else the encoder recorded with the weights, else a pipeline's sub-folder."""
    if flag_value is not None:
        if flag_value != "toy" and not flag_value.startswith("toy:") and not Path(flag_value).exists():
            raise ForcelabError(f"{flag} {flag_value}: not found")
        return flag_value
    if recorded is not None:
        return recorded
    for folder in folders:
        if (folder / sub / "config.json").is_file():
            return str(folder)
    raise ForcelabError(f"the model has no {sub}/ folder beside it: pass {flag} DIR (or {flag} toy{hint})")


def latent_switch_frame(frame: int, stride: int, unit: int, latent_frames: int) -> int:
    """Video frame -> latent frame; it must start a chunk (block) inside the video."""
    valid = [1 + (u - 1) * stride for u in range(unit, latent_frames, unit)]
    if frame not in valid:
        listed = ", ".join(map(str, valid[:8])) + (" ..." if len(valid) > 8 else "")
        raise ForcelabError(f"--switch at frame {frame}: switches go at chunk boundaries inside the "
                            f"video ({latent_frames} latent frames): {listed or 'none - the video is one chunk'}")
    return 1 + (frame - 1) // stride


# ---------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    from ..data.video import to_uint8_frames, write_video
    from .autoencoder import latent_frames as to_latent, load_autoencoder, pixel_frames
    from .checkpoint import read_config
    from .config import DiTConfig
    from .prefix import PrefixInput
    from .dit import CausalDiT
    from .text_encoder import load_text_encoder

    out_dir = check_output_dir(args.output, "--output")
    device = parse_device(args.device)
    names, texts = read_prompts(args)
    switch_items = parse_switches(args.switch)
    plan = build_plan(args)
    cond = PrefixInput.from_args(args)          # None without --image / --video
    if switch_items and args.plan == "teacher":
        raise ForcelabError("--switch needs a causal plan (chunkwise, rolling, step_matrix), not the teacher")
    dit_dir, folders = resolve_model(args.model)
    try:
        config, fmt = read_config(dit_dir)
    except CheckpointError as e:
        raise ForcelabError(f"model {args.model}: {e}") from None
    toy = DiTConfig.preset("toy")
    toy_shape = (config.in_channels, config.text_dim) == (toy.in_channels, toy.text_dim)
    hint = "; the model has the toy preset's shape" if toy_shape else ""
    from .run_folder import recorded_encoders
    recorded = recorded_encoders(dit_dir) or {}
    vae_spec = resolve_encoder(args.vae, folders, "vae", "--vae", hint, recorded.get("vae"))
    te_spec = resolve_encoder(args.text_encoder, folders, "text_encoder", "--text-encoder", hint,
                              recorded.get("text_encoder"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]

    ae = load_autoencoder(vae_spec, device=device)
    te = load_text_encoder(te_spec, device=device)
    if ae.latent_channels != config.in_channels:
        raise ForcelabError(f"autoencoder {ae.name} gives {ae.latent_channels} latent channels, the DiT "
                            f"takes {config.in_channels}: pass the matching --vae")
    if te.dim != config.text_dim or te.max_length > config.text_len:
        raise ForcelabError(f"text encoder {te.name} gives [{te.max_length}, {te.dim}] embeddings, the DiT "
                            f"takes at most [{config.text_len}, {config.text_dim}]: pass the matching --text-encoder")
    default_size = cond.size if cond else TOY_SIZE if ae.name.startswith("toy") else WAN_SIZE
    height, width = args.height or default_size[0], args.width or default_size[1]
    cell = ae.spatial_stride * max(config.patch_size[1:])
    if cond:
        cond.check_size(height, width, cell, resized=args.height is not None or args.width is not None)
    if height % cell or width % cell:
        raise ForcelabError(f"--height/--width {height}x{width} must be multiples of {cell} "
                            f"(autoencoder stride {ae.spatial_stride} x patch {config.patch_size[1:]})")
    chunk = 1 if args.plan == "teacher" else cache_options(plan, config)[0]
    unit = 1 if args.plan == "teacher" else plan.unit_frames(chunk)
    frames = args.frames or pixel_frames(ae, -(-DEFAULT_LATENT_FRAMES // unit) * unit)
    latent = to_latent(ae, frames)
    if frames < 1 or pixel_frames(ae, latent) != frames or latent % unit:
        good = [pixel_frames(ae, k * unit) for k in range(1, 9)]
        raise ForcelabError(f"--frames {frames}: the {args.plan} plan needs a whole number of "
                            f"{unit}-latent-frame chunks (stride {ae.temporal_stride}): e.g. {good}")
    prefix_px, p = (None, 0) if cond is None else cond.read(ae, unit, (height, width), latent, frames)
    switch_at = [(latent_switch_frame(f, ae.temporal_stride, unit, latent), f, t) for f, t in switch_items]
    jobs = [(k, i) for k in range(len(names)) for i in range(args.samples)]
    files = {job: _file_name(names[job[0]], job, args.vbench) for job in jobs}
    if len(set(files.values())) != len(files):
        raise ForcelabError("two videos would get the same file name (repeated prompts with --vbench?)")
    check_existing(out_dir, list(files.values()), args.overwrite)
    check_size(config, ae, plan, args, jobs, height, width, frames, latent, device, dtype)

    model = CausalDiT.from_pretrained(dit_dir, dtype=dtype, device=device)
    lat_h, lat_w = height // ae.spatial_stride, width // ae.spatial_stride
    neg = te.encode([args.negative_prompt])[0].to(device) if args.plan == "teacher" else None
    sw_emb = [te.encode([t])[0].to(device) for _, _, t in switch_at]
    settings = dict(model=str(args.model), model_format=fmt, model_config=dataclasses.asdict(config),
                    vae=ae.name, text_encoder=te.name, plan=plan.describe(), frames=frames,
                    latent_frames=latent, height=height, width=width, fps=args.fps, batch=args.batch,
                    negative_prompt=args.negative_prompt if args.plan == "teacher" else None,
                    switches=[dict(frame=f, latent_frame=lf, prompt=t, mode=args.switch_mode,
                                   recache_frames=args.recache_frames, rope_jump=args.rope_jump)
                              for lf, f, t in switch_at],
                    device=str(device), dtype=str(dtype).replace("torch.", ""), vbench=args.vbench,
                    conditioning=None if cond is None else dict(cond.describe(ae, unit), prefix_latent_frames=p),
                    vbench_suite=getattr(args, "vbench_suite", None), samples=args.samples)
    prefix = None if prefix_px is None else ae.encode(prefix_px.to(device)).float()

    from tqdm import tqdm
    from .. import __version__
    clean_stale(out_dir)  # temporaries of an earlier run that was killed while writing a video
    bar = tqdm(total=len(jobs) * latent, unit="frame", disable=args.quiet or None, desc="generate")
    with torch.no_grad():
        for b0 in range(0, len(jobs), args.batch):
            batch = jobs[b0:b0 + args.batch]
            seeds = [args.seed + i for _, i in batch]
            ctx = te.encode([texts[k] for k, _ in batch])[0].to(device)
            n = len(batch)
            noise = Noise(seeds, config.in_channels, lat_h, lat_w, device=device)
            switches = [Switch(lf, e.expand(n, -1, -1), mode=args.switch_mode, recache_frames=args.recache_frames,
                               rope_jump=args.rope_jump) for (lf, _, _), e in zip(switch_at, sw_emb)]
            decoder, pixels, t0 = ae.decode_stream(), [], time.perf_counter()
            given = None if prefix is None else prefix.expand(n, -1, -1, -1, -1)
            if given is not None:   # the video starts with the given frames (decoded)
                pixels.append(decoder.push(given).float().cpu())
                bar.update(p * n)
            for chunk_out in stream(model, plan, ctx, noise, latent - p, switches=switches, prefix=given,
                                    negative=None if neg is None else neg.expand(n, -1, -1)):
                pixels.append(decoder.push(chunk_out.x).float().cpu())
                bar.update(chunk_out.x.shape[2] * n)
            seconds = time.perf_counter() - t0
            video = torch.cat(pixels, dim=2)
            for j, (k, i) in enumerate(batch):
                path = out_dir / files[(k, i)]
                with atomic_path(path, overwrite=args.overwrite, what="--output") as tmp:
                    write_video(tmp, to_uint8_frames(video[j].transpose(0, 1)), args.fps, container_format="mp4")
                side = dict(video=path.name, prompt=names[k], prompt_text=texts[k], sample=i,
                            seed=seeds[j], seconds_per_batch=round(seconds, 3), forcelab=__version__, **settings)
                write_text_atomic(path.with_suffix(".json"), json.dumps(side, indent=2, default=str) + "\n",
                                  overwrite=args.overwrite, what="--output")
    bar.close()
    print(f"wrote {len(jobs)} video(s) to {out_dir}")
    return 0


def _sidecar_is_ours(video: Path) -> bool:
    """Whether `video` and its sidecar were written by forcelab generate (the sidecar says so)."""
    try:
        side = json.loads(video.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(side, dict) and "forcelab" in side and side.get("video") == video.name


def check_existing(out_dir: Path, names: list[str], overwrite: bool) -> None:
    """Never replace earlier results silently, and never a file forcelab did not write."""
    taken = [n for n in names if (out_dir / n).exists() or (out_dir / n).with_suffix(".json").exists()]
    if not taken:
        return
    if not overwrite:
        raise ForcelabError(f"--output {out_dir}: already holds {len(taken)} of this run's files (e.g. "
                            f"{taken[0]}); choose a new --output, or pass --overwrite to replace an earlier "
                            f"run's videos")
    foreign = [n for n in taken if not _sidecar_is_ours(out_dir / n)]
    if foreign:
        raise ForcelabError(f"--output {out_dir}: {foreign[0]} (or its .json) was not written by forcelab "
                            f"generate; it is never replaced - choose a new --output")


def check_size(config, ae, plan, args, jobs, height, width, frames, latent, device, dtype) -> None:
    """Refuse sizes the model cannot address (RoPE table) or the device cannot hold, before
    loading anything: the decoded video (float32 on the host) and the KV cache (on the device)."""
    _, ph, pw = config.patch_size
    rows, cols = height // ae.spatial_stride // ph, width // ae.spatial_stride // pw
    if max(rows, cols) > config.rope_max_len:
        limit = config.rope_max_len * ph * ae.spatial_stride
        raise ForcelabError(f"--height/--width {height}x{width}: {max(rows, cols)} tokens per row/column, "
                            f"the model's RoPE table has {config.rope_max_len} (rope_max_len): at most "
                            f"{limit} pixels")
    window = None if args.plan == "teacher" else plan.window_frames  # the teacher sees the whole clip
    window = config.window_frames if window is None and args.plan != "teacher" else window
    if window in (None, 0) and latent > config.rope_max_len:
        raise ForcelabError(f"--frames {frames}: {latent} latent frames, more than the model's RoPE table "
                            f"({config.rope_max_len}, rope_max_len) without an attention window; lower "
                            f"--frames or stream with --window")
    batch = min(args.batch, len(jobs))
    video_bytes = 2 * batch * 3 * frames * height * width * 4  # decoded chunks + their concatenation
    fits_memory(video_bytes, torch.device("cpu"), f"--frames {frames} at {height}x{width} x --batch {batch}",
                "lower --frames, --height/--width or --batch")
    kept = min(latent, window) if window else latent
    tokens = kept * rows * cols
    itemsize = torch.empty((), dtype=dtype).element_size()
    cache_bytes = 2 * config.num_layers * batch * tokens * config.dim * itemsize
    fits_memory(cache_bytes, device, f"the KV cache for {kept} latent frames at {height}x{width} x --batch {batch}",
                "lower --frames (or set --window), --height/--width or --batch")


def _file_name(prompt: str, job: tuple[int, int], vbench: bool) -> str:
    k, i = job
    if vbench:
        name = f"{prompt.replace('/', ' ')}-{i}.mp4"
        if len(name.encode()) > MAX_NAME_BYTES:
            raise ForcelabError(f"--vbench: the file name of prompt {k + 1} would exceed {MAX_NAME_BYTES} bytes; "
                                f"name files by the original prompts (--prompts) and condition on the long "
                                f"ones with --extended-prompts")
        return name
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:60] or "prompt"
    return f"{k:04d}-{slug}-{i}.mp4"
