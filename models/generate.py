"""`forcelab generate`: prompts -> mp4 videos (PyAV, libx264), each with a JSON sidecar.

    forcelab generate CKPT --prompt "a red ball bouncing" --plan chunkwise --steps 4
    forcelab generate CKPT --prompts prompts.txt --samples 5 --vbench --output out/vbench
    forcelab generate CKPT --prompt "a red ball" --switch "8:a blue ball" --window 6 --sink 2

CKPT is a DiT checkpoint directory (save_pretrained, original Wan or diffusers) or a Wan
diffusers pipeline folder (transformer/, vae/, text_encoder/, tokenizer/). The encoders
come from --vae / --text-encoder ("toy" or a directory), else from the pipeline folder.
Frame counts are video frames; switch points are video frames at chunk boundaries.
Every input is checked before the DiT's weights are loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from pathlib import Path

import torch

from ..config import DTYPES
from ..errors import CheckpointError, ForcelabError
from .plans import PLANS, Chunkwise, Rolling, StepMatrix, Teacher, default_timesteps, warp_timesteps
from .rollout import Noise, Switch, cache_options, stream
from .schedule import SOLVERS

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
    g.add_argument("--negative-prompt", default="", help="the teacher's unconditional prompt")
    g.add_argument("--switch", action="append", default=[], metavar="FRAME:PROMPT",
                   help="from video frame FRAME on, condition on PROMPT (repeatable)")
    g.add_argument("--switch-mode", choices=("recache", "flush", "keep"), default="recache",
                   help="recache: rebuild the KV cache with the new prompt (LongLive); flush: keep "
                   "sink + last frame (Infinity-RoPE); keep: only the cross-attention changes")
    g.add_argument("--recache-frames", type=int, default=None, help="latent frames re-run at a switch")
    g.add_argument("--rope-jump", type=int, default=0, help="temporal RoPE cut at each switch (positions)")
    g = p.add_argument_group("plan")
    g.add_argument("--plan", choices=PLANS, default="chunkwise")
    g.add_argument("--steps", default=None, help="number of steps, or a denoising list like "
                   "1000,750,500,250 (warped by --shift); default 4 (teacher: 50)")
    g.add_argument("--shift", type=float, default=5.0, help="sigma shift")
    g.add_argument("--guidance", type=float, default=None, help="teacher CFG scale (default 5): "
                   "uncond + guidance * (cond - uncond)")
    g.add_argument("--solver", choices=SOLVERS, default="unipc", help="teacher ODE solver")
    g.add_argument("--chunk", type=int, default=None, help="latent frames per chunk (default: the model's)")
    g.add_argument("--window", type=int, default=None, help="attention window in latent frames (0: none)")
    g.add_argument("--sink", type=int, default=None, help="attention sink in latent frames")
    g.add_argument("--ar-step", type=int, default=1, help="step_matrix: levels between blocks")
    g.add_argument("--block", type=int, default=None, help="step_matrix: latent frames per block")
    g.add_argument("--segment", type=int, default=None, help="step_matrix: latent frames per segment")
    g.add_argument("--context-noise", type=float, default=0.0, help="timestep of the commit pass")
    g.add_argument("--update", choices=("renoise", "euler"), default=None,
                   help="how a frame reaches its next level (default: renoise; step_matrix: euler)")
    g = p.add_argument_group("video")
    g.add_argument("--frames", type=int, default=None, help="video frames (default: 21 latent frames, 81 with the Wan VAE)")
    g.add_argument("--height", type=int, default=None, help="pixels (default 32 toy, 480 Wan)")
    g.add_argument("--width", type=int, default=None, help="pixels (default 32 toy, 832 Wan)")
    g.add_argument("--fps", type=float, default=16.0)
    g.add_argument("--seed", type=int, default=0, help="sample i of every prompt uses seed + i")
    g.add_argument("--samples", type=int, default=1, help="videos per prompt")
    g.add_argument("--batch", type=int, default=1, help="videos generated together")
    g = p.add_argument_group("output and hardware")
    g.add_argument("--output", default="outputs/generate", help="folder for the mp4s and sidecars")
    g.add_argument("--vbench", action="store_true", help="name files {prompt}-{i}.mp4 as VBench expects")
    g.add_argument("--vae", default=None, help='"toy" or a directory (default: the model folder\'s vae/)')
    g.add_argument("--text-encoder", default=None, help='"toy" or a directory (default: the model folder\'s text_encoder/)')
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="DiT dtype (default: bf16 on cuda, else fp32)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------- checks (no work yet)
def read_prompts(args) -> tuple[list[str], list[str]]:
    """-> (names, texts): names go into file names, texts condition the model."""
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
    p = Path(path)
    if not p.is_file():
        raise ForcelabError(f"{flag}: file not found: {p}")
    return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def parse_switches(items: list[str]) -> list[tuple[int, str]]:
    out = []
    for item in items:
        frame, sep, prompt = item.partition(":")
        if not sep or not frame.strip().isdigit() or not prompt.strip():
            raise ForcelabError(f"--switch {item!r}: write FRAME:PROMPT, e.g. --switch '48:a cat jumps'")
        out.append((int(frame), prompt.strip()))
    return out


def parse_steps(text: str | None, plan: str) -> int | list[float]:
    if text is None:
        return 50 if plan == "teacher" else 4
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ForcelabError(f"--steps {text!r}: give a number of steps or a list like 1000,750,500,250") from None
    if len(values) == 1 and "," not in str(text) and values[0].is_integer():
        return int(values[0])
    if plan == "teacher":
        raise ForcelabError("--steps: the teacher takes a number of solver steps, not a list")
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
    """-> (DiT directory, folders to look in for encoders)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ForcelabError(f"model {path}: not found")
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


def resolve_encoder(flag_value: str | None, folders: list[Path], sub: str, flag: str, hint: str) -> str:
    if flag_value is not None:
        if flag_value != "toy" and not flag_value.startswith("toy:") and not Path(flag_value).exists():
            raise ForcelabError(f"{flag} {flag_value}: not found")
        return flag_value
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
    from .dit import CausalDiT
    from .text_encoder import load_text_encoder

    names, texts = read_prompts(args)
    switch_items = parse_switches(args.switch)
    plan = build_plan(args)
    if switch_items and args.plan == "teacher":
        raise ForcelabError("--switch needs a causal plan (chunkwise, rolling, step_matrix), not the teacher")
    for flag, v, lo in (("--samples", args.samples, 1), ("--batch", args.batch, 1), ("--fps", args.fps, 1e-3)):
        if v < lo:
            raise ForcelabError(f"{flag} must be >= {lo}, got {v}")
    dit_dir, folders = resolve_model(args.model)
    try:
        config, fmt = read_config(dit_dir)
    except CheckpointError as e:
        raise ForcelabError(f"model {args.model}: {e}") from None
    toy = DiTConfig.preset("toy")
    toy_shape = (config.in_channels, config.text_dim) == (toy.in_channels, toy.text_dim)
    hint = "; the model has the toy preset's shape" if toy_shape else ""
    vae_spec = resolve_encoder(args.vae, folders, "vae", "--vae", hint)
    te_spec = resolve_encoder(args.text_encoder, folders, "text_encoder", "--text-encoder", hint)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]

    ae = load_autoencoder(vae_spec, device=device)
    te = load_text_encoder(te_spec, device=device)
    if ae.latent_channels != config.in_channels:
        raise ForcelabError(f"autoencoder {ae.name} gives {ae.latent_channels} latent channels, the DiT "
                            f"takes {config.in_channels}: pass the matching --vae")
    if te.dim != config.text_dim or te.max_length > config.text_len:
        raise ForcelabError(f"text encoder {te.name} gives [{te.max_length}, {te.dim}] embeddings, the DiT "
                            f"takes at most [{config.text_len}, {config.text_dim}]: pass the matching --text-encoder")
    default_size = TOY_SIZE if ae.name.startswith("toy") else WAN_SIZE
    height, width = args.height or default_size[0], args.width or default_size[1]
    cell = ae.spatial_stride * max(config.patch_size[1:])
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
    switch_at = [(latent_switch_frame(f, ae.temporal_stride, unit, latent), f, t) for f, t in switch_items]
    jobs = [(k, i) for k in range(len(names)) for i in range(args.samples)]
    out_dir = Path(args.output)
    files = {job: _file_name(names[job[0]], job, args.vbench) for job in jobs}
    if len(set(files.values())) != len(files):
        raise ForcelabError("two videos would get the same file name (repeated prompts with --vbench?)")

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
                    device=str(device), dtype=str(dtype).replace("torch.", ""), vbench=args.vbench)

    from tqdm import tqdm
    from .. import __version__
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
            for chunk_out in stream(model, plan, ctx, noise, latent, switches=switches,
                                    negative=None if neg is None else neg.expand(n, -1, -1)):
                pixels.append(decoder.push(chunk_out.x).float().cpu())
                bar.update(chunk_out.x.shape[2] * n)
            seconds = time.perf_counter() - t0
            video = torch.cat(pixels, dim=2)
            for j, (k, i) in enumerate(batch):
                path = out_dir / files[(k, i)]
                write_video(path, to_uint8_frames(video[j].transpose(0, 1)), args.fps)
                side = dict(video=path.name, prompt=names[k], prompt_text=texts[k], sample=i,
                            seed=seeds[j], seconds_per_batch=round(seconds, 3), forcelab=__version__, **settings)
                path.with_suffix(".json").write_text(json.dumps(side, indent=2, default=str) + "\n")
    bar.close()
    print(f"wrote {len(jobs)} video(s) to {out_dir}")
    return 0


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
