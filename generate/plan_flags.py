"""`forcelab generate` flags -> a sampling plan (models/plans.py) and prompt switches.

    plan = build_plan(args)                 # --plan --steps --shift --guidance --chunk --window ...
    switches = parse_switches(["8:a blue ball"])   # [(8, "a blue ball")]
"""

from __future__ import annotations

import math

from ..errors import ForcelabError
from ..models.plans import (STUDENT_STEPS, TEACHER_GUIDANCE, TEACHER_STEPS, Chunkwise, Rolling, StepMatrix, Teacher,
                            default_timesteps, warp_timesteps)
from ..models.schedule import NUM_TRAIN_TIMESTEPS
from ..validate import in_range, positive_int



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
        return TEACHER_STEPS if plan == "teacher" else STUDENT_STEPS
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
                            ("--cache-policy", getattr(args, "cache_policy", None)),
                            ("--block", args.block), ("--segment", args.segment), ("--update", args.update)):
            if value is not None:
                raise ForcelabError(f"{flag} does not apply to the teacher plan (bidirectional, whole clip)")
        return Teacher(steps=steps, shift=args.shift, solver=args.solver,
                       guidance=TEACHER_GUIDANCE if args.guidance is None else args.guidance)
    if args.guidance is not None:
        raise ForcelabError(f"--guidance applies to the teacher plan only ({args.plan} runs the student without CFG)")
    timesteps = default_timesteps(steps, args.shift) if isinstance(steps, int) else warp_timesteps(steps, args.shift)
    common = dict(timesteps=timesteps, chunk_frames=args.chunk, window_frames=args.window,
                  sink_frames=args.sink, context_noise=args.context_noise)
    if args.update:
        common["update"] = args.update
    if getattr(args, "cache_policy", None):
        common["cache_policy"] = args.cache_policy
    if args.plan == "step_matrix":
        return StepMatrix(ar_step=args.ar_step, block_frames=args.block, segment_frames=args.segment, **common)
    if args.block is not None or args.segment is not None:
        raise ForcelabError("--block and --segment apply to the step_matrix plan only")
    return (Chunkwise if args.plan == "chunkwise" else Rolling)(**common)
