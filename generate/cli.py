"""`forcelab generate`: prompts -> mp4 videos (PyAV, libx264), each with a JSON sidecar.

    forcelab generate CKPT --prompt "a red ball bouncing" --plan chunkwise --steps 4
    forcelab generate CKPT --prompts prompts.txt --samples 5 --vbench --output out/vbench
    forcelab generate CKPT --prompt "a red ball" --switch "8:a blue ball" --window 6 --sink 2
    forcelab generate CKPT --prompt "a red ball" --window 6 --sink 2 --cache-policy temporal_merge
    forcelab generate CKPT --prompt "a red ball" --image first.png          # image-to-video
    forcelab generate CKPT --prompt "a red ball" --video clip.mp4 --prefix-frames 9   # extension

The flags become one call of generate() (api.py), which documents the model, the encoders and
the frame counts; every input is checked before the DiT's weights are loaded.
"""

from __future__ import annotations

import argparse

from ..dtypes import DTYPES
from ..data.video import DEFAULT_FPS, check_fps
from ..fsio import check_output_dir
from ..models.cache_policy import POLICIES, check_policy
from ..models.plans import PLANS, SAMPLING_SHIFT, UPDATES
from ..models.schedule import NUM_TRAIN_TIMESTEPS, SOLVERS
from ..validate import (arg, finite_float, in_range, non_negative_int, parse_device, positive_float,
                        positive_int, seed)
from ..models.rollout import SWITCH_MODES
from .api import DEFAULT_OUTPUT, generate
from .plan_flags import build_plan, parse_switches
from .prompts import read_prompts


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
    g.add_argument("--switch-mode", choices=SWITCH_MODES, default="recache",
                   help="recache: rebuild the KV cache with the new prompt (LongLive); flush: keep "
                   "sink + last frame (Infinity-RoPE); keep: only the cross-attention changes")
    g.add_argument("--recache-frames", type=arg(non_negative_int), default=None,
                   help="latent frames re-run at a switch")
    g.add_argument("--rope-jump", type=arg(non_negative_int), default=0, help="temporal RoPE cut at each switch (positions)")
    g = p.add_argument_group("plan")
    g.add_argument("--plan", choices=PLANS, default="chunkwise")
    g.add_argument("--steps", default=None, help="number of steps, or a denoising list like "
                   "1000,750,500,250 (warped by --shift); default 4 (teacher: 50)")
    g.add_argument("--shift", type=arg(positive_float), default=SAMPLING_SHIFT, help="sigma shift")
    g.add_argument("--guidance", type=arg(finite_float), default=None, help="teacher CFG scale (default 5): "
                   "uncond + guidance * (cond - uncond)")
    g.add_argument("--solver", choices=SOLVERS, default="unipc", help="teacher ODE solver")
    g.add_argument("--chunk", type=arg(positive_int), default=None, help="latent frames per chunk (default: the model's)")
    g.add_argument("--window", type=arg(non_negative_int), default=None, help="attention window in latent frames (0: none)")
    g.add_argument("--sink", type=arg(non_negative_int), default=None, help="attention sink in latent frames")
    g.add_argument("--cache-policy", type=arg(check_policy), default=None, metavar="NAME[:k=v,...]",
                   help=f"what a full window keeps: {', '.join(POLICIES)} (default sink_window; "
                   "e.g. deep_forcing:recent=2, dummy_heads:fraction=0.25,short=0)")
    g.add_argument("--ar-step", type=arg(non_negative_int), default=1, help="step_matrix: levels between blocks")
    g.add_argument("--block", type=arg(positive_int), default=None, help="step_matrix: latent frames per block")
    g.add_argument("--segment", type=arg(positive_int), default=None, help="step_matrix: latent frames per segment")
    g.add_argument("--context-noise", type=arg(in_range, 0, NUM_TRAIN_TIMESTEPS - 1), default=0.0, help="timestep of the commit pass")
    g.add_argument("--update", choices=UPDATES, default=None,
                   help="how a frame reaches its next level (default: renoise; step_matrix: euler)")
    g = p.add_argument_group("video")
    g.add_argument("--frames", type=arg(positive_int), default=None, help="video frames (default: 21 latent frames, 81 with the Wan VAE)")
    g.add_argument("--height", type=arg(positive_int), default=None, help="pixels (default 32 toy, 480 Wan)")
    g.add_argument("--width", type=arg(positive_int), default=None, help="pixels (default 32 toy, 832 Wan)")
    g.add_argument("--fps", type=arg(check_fps), default=DEFAULT_FPS, help="frames per second written (0.01-1000)")
    g.add_argument("--seed", type=arg(seed), default=0, help="sample i of every prompt uses seed + i (63-bit)")
    g.add_argument("--samples", type=arg(positive_int), default=1, help="videos per prompt")
    g.add_argument("--batch", type=arg(positive_int), default=1, help="videos generated together")
    g = p.add_argument_group("output and hardware")
    g.add_argument("--output", default=DEFAULT_OUTPUT, help=f"folder for the mp4s and sidecars (default: {DEFAULT_OUTPUT})")
    g.add_argument("--overwrite", action="store_true", help="replace videos of an earlier forcelab run "
                   "with the same names in --output (default: refuse); other files are never replaced")
    g.add_argument("--vbench", action="store_true", help="name files {prompt}-{i}.mp4 as VBench expects")
    g.add_argument("--vae", default=None, help='"toy" or a directory (default: the model folder\'s vae/)')
    g.add_argument("--text-encoder", default=None, help='"toy" or a directory (default: the model folder\'s text_encoder/)')
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="DiT dtype (default: bf16 on cuda, else fp32)")
    g.add_argument("--quiet", action="store_true", help="no progress output")
    add_prefix_arguments(p)


def add_prefix_arguments(p: argparse.ArgumentParser) -> None:
    """The conditioning flags (image-to-video, video extension; prefix.py)."""
    g = p.add_argument_group("conditioning (causal plans)")
    g.add_argument("--image", help="first frame (PNG/JPEG): held for the first chunk, the video continues "
                   "it; without --height/--width the image's size, else scaled to cover and center-cropped")
    g.add_argument("--video", help="a clip whose first --prefix-frames frames the video continues "
                   "(sized like --image)")
    g.add_argument("--prefix-frames", type=arg(positive_int), default=None,
                   help="--video: frames taken as the prefix, whole chunks (default: one chunk)")


def run(args: argparse.Namespace) -> int:
    # where to write and where to run are checked first (generate() checks them again, cheaply),
    # then what to say and how to sample; generate() checks the rest before loading the DiT
    out_dir = check_output_dir(args.output, "--output")
    device = parse_device(args.device)
    names, texts = read_prompts(args)
    switches = parse_switches(args.switch)
    plan = build_plan(args)
    videos = generate(args.model, texts, names=names, plan=plan, output=out_dir, seed=args.seed,
                      samples=args.samples, batch=args.batch, frames=args.frames, height=args.height,
                      width=args.width, fps=args.fps, switches=switches, switch_mode=args.switch_mode,
                      recache_frames=args.recache_frames, rope_jump=args.rope_jump,
                      negative_prompt=args.negative_prompt, image=args.image, video=args.video,
                      prefix_frames=args.prefix_frames, vae=args.vae, text_encoder=args.text_encoder,
                      device=device, dtype=args.dtype, overwrite=args.overwrite, vbench=args.vbench,
                      vbench_suite=getattr(args, "vbench_suite", None), progress=False if args.quiet else None)
    print(f"wrote {len(videos)} video(s) to {out_dir}")
    return 0
