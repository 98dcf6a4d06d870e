"""generate(): prompts -> mp4 videos, each with a JSON sidecar, with any sampling plan.

    videos = generate("runs/sf", ["a red ball bouncing"], plan=Chunkwise(default_timesteps(4, 5.0)),
                      frames=81, output="out/videos", samples=2, seed=7)
    videos[0].path, videos[0].sidecar               # out/videos/0000-a_red_ball_bouncing-0.mp4, {...}
    generate(run, ["a red ball"], switches=[(8, "a blue ball")], plan=Chunkwise(window_frames=6, sink_frames=2))
    generate(run, ["a red ball"], image="first.png")                        # image-to-video
    generate(run, ["a red ball"], video="clip.mp4", prefix_frames=9)        # video extension

`model` is a DiT checkpoint directory (save_pretrained, original Wan or diffusers), a Wan
diffusers pipeline folder (transformer/, vae/, text_encoder/, tokenizer/) or a forcelab run
(its generator, EMA when kept). The encoders come from `vae` / `text_encoder` ("toy" or a
directory), else those recorded with the weights, else the pipeline folder. Frame counts are
video frames; switch points are video frames at chunk boundaries. With `image` / `video` the
given frames are encoded and committed to the cache first, and the video (`frames` in all,
prefix included) continues them; see prefix.py.

Every input is checked before the DiT's weights are loaded; a bad one raises ForcelabError
with one line naming it by its `forcelab generate` flag (frames -> --frames).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..dtypes import DTYPES
from ..data.video import DEFAULT_FPS, check_fps
from ..errors import CheckpointError, ForcelabError
from ..fsio import check_output_dir, clean_stale
from ..models.plans import CausalPlan, Chunkwise, Teacher
from ..models.rollout import SWITCH_MODES, Noise, Switch, cache_options, stream
from ..progress import progress_bar
from ..validate import in_range, non_negative_int, parse_device, positive_int, seed
from .limits import check_size, latent_switch_frame
from .prefix import PrefixInput
from .sources import resolve_encoder, resolve_model
from .writer import check_existing, video_file_name, write_video_and_sidecar

TOY_SIZE, WAN_SIZE = (32, 32), (480, 832)   # default pixel sizes for the toy codec / the Wan VAE
DEFAULT_LATENT_FRAMES = 21                  # Wan's 81-frame clip (rounded up to whole chunks)
DEFAULT_OUTPUT = "outputs/generate"
MAX_VIDEOS = 100_000      # videos in one run (VBench's full protocol is 4,730): split larger runs by --seed
EXAMPLE_FRAME_COUNTS = 8                    # valid --frames values shown when one is not


@dataclass(frozen=True)
class GeneratedVideo:
    """One written video: its mp4 and the sidecar (every setting, the prompt, the seed)."""
    path: Path
    sidecar: dict

    @property
    def sidecar_path(self) -> Path:
        return self.path.with_suffix(".json")


@dataclass
class Request:
    """The options of one generate() call (see generate's arguments)."""
    model: str | Path
    texts: list[str]
    names: list[str]
    plan: CausalPlan | Teacher
    output: Path
    device: torch.device
    seed: int = 0
    samples: int = 1
    batch: int = 1
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    fps: float = DEFAULT_FPS
    switches: list[tuple[int, str]] = field(default_factory=list)
    switch_mode: str = "recache"
    recache_frames: int | None = None
    rope_jump: int = 0
    negative_prompt: str = ""
    vae: str | None = None
    text_encoder: str | None = None
    dtype: str | None = None
    overwrite: bool = False
    vbench: bool = False
    vbench_suite: dict | None = None
    progress: bool | None = None

    @property
    def teacher(self) -> bool:
        return isinstance(self.plan, Teacher)


def generate(model, prompts, *, plan=None, names=None, output=DEFAULT_OUTPUT, seed=0, samples=1, batch=1,
             frames=None, height=None, width=None, fps=DEFAULT_FPS, switches=(), switch_mode="recache",
             recache_frames=None, rope_jump=0, negative_prompt="", image=None, video=None, prefix_frames=None,
             vae=None, text_encoder=None, device=None, dtype=None, overwrite=False, vbench=False,
             vbench_suite=None, progress=None) -> list[GeneratedVideo]:
    """Generate `samples` videos per prompt (sample i with seed + i) into `output`.

    prompts: the texts the model is conditioned on (a str is one prompt); names: what the
    files are named by (default: the prompts; VBench with extended prompts names them by the
    originals). plan: a plan of models/plans.py (default: 4-step Chunkwise, shift 5).
    frames / height / width: video frames and pixels (default: 21 latent frames, the
    encoder's size or the prefix's). switches: [(video frame, prompt)], applied as
    switch_mode (recache | flush | keep) with recache_frames and rope_jump. image / video /
    prefix_frames: the frames the video continues (causal plans). vae / text_encoder: "toy"
    or a directory. device: "cpu", "cuda", "cuda:N" (default: cuda if available); dtype: a
    name of dtypes.DTYPES (default bf16 on cuda, else fp32). overwrite: replace an earlier
    forcelab run's videos of the same names (never another file). vbench: name files
    "{prompt}-{i}.mp4"; vbench_suite: what vbench_suite.select_prompts chose (recorded).
    progress: False for none (default: a bar on a terminal, else a line every 10%). Returns the videos written.
    """
    out_dir = check_output_dir(output, "--output")
    req = Request(model=model, texts=[], names=[], plan=plan, output=out_dir, device=parse_device(device),
                  seed=seed, samples=samples, batch=batch, frames=frames, height=height, width=width, fps=fps,
                  switches=list(switches), switch_mode=switch_mode, recache_frames=recache_frames,
                  rope_jump=rope_jump, negative_prompt=negative_prompt, vae=vae, text_encoder=text_encoder,
                  dtype=dtype, overwrite=overwrite, vbench=vbench, vbench_suite=vbench_suite, progress=progress)
    _check_options(req, prompts, names)
    cond = PrefixInput.from_options(image, video, prefix_frames, req.plan.name)  # None without either
    return run(req, cond)


def _check_options(req: Request, prompts, names) -> None:
    """The call's own arguments (the CLI's flags are checked as they are parsed)."""
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise ForcelabError("no prompt: give --prompt TEXT or --prompts FILE")
    if any(not isinstance(t, str) or not t.strip() for t in texts):
        raise ForcelabError("prompts: every prompt must be a non-empty string")
    req.texts = texts
    req.names = texts if names is None else ([names] if isinstance(names, str) else list(names))
    if len(req.names) != len(texts):
        raise ForcelabError(f"names: {len(req.names)} names for {len(texts)} prompts; they must pair up")
    req.plan = Chunkwise() if req.plan is None else req.plan
    if not isinstance(req.plan, (CausalPlan, Teacher)):
        raise ForcelabError(f"plan: a plan of models/plans.py (Chunkwise, Rolling, StepMatrix, Teacher), "
                            f"got {type(req.plan).__name__}")
    req.rope_jump = non_negative_int(req.rope_jump, "--rope-jump")
    req.samples, req.batch = positive_int(req.samples, "--samples"), positive_int(req.batch, "--batch")
    in_range(len(texts) * req.samples, "prompts x --samples", 1, MAX_VIDEOS, integer=True,
             why="videos in one run; split larger runs over --seed ranges")
    req.seed = seed(req.seed, "--seed")
    seed(req.seed + req.samples - 1, "--seed + --samples - 1")     # the last sample's seed
    req.fps = check_fps(req.fps, "--fps")
    for flag, value in (("--frames", req.frames), ("--height", req.height), ("--width", req.width)):
        if value is not None:
            positive_int(value, flag)
    if req.recache_frames is not None:
        non_negative_int(req.recache_frames, "--recache-frames")
    if req.switch_mode not in SWITCH_MODES:
        raise ForcelabError(f"--switch-mode {req.switch_mode!r}: choose one of {', '.join(SWITCH_MODES)}")
    if req.dtype is not None and req.dtype not in DTYPES:
        raise ForcelabError(f"--dtype {req.dtype!r}: choose one of {', '.join(sorted(DTYPES))}")
    for item in req.switches:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], str) and item[1].strip()):
            raise ForcelabError(f"switches: {item!r} is not a (video frame, prompt) pair")
        positive_int(item[0], f"--switch {item[0]}:{item[1]}: FRAME")


def run(req: Request, cond: PrefixInput | None) -> list[GeneratedVideo]:
    """Check everything that needs the model's config and the encoders, then generate."""
    from ..models.checkpoint import read_config

    if req.switches and req.teacher:
        raise ForcelabError("--switch needs a causal plan (chunkwise, rolling, step_matrix), not the teacher")
    dit_dir, folders = resolve_model(req.model)
    try:
        config, fmt = read_config(dit_dir)
    except CheckpointError as e:
        raise ForcelabError(f"model {req.model}: {e}") from None
    ae, te = _load_encoders(req, config, dit_dir, folders)
    geometry = _geometry(req, config, ae, cond)
    jobs = [(k, i) for k in range(len(req.names)) for i in range(req.samples)]
    files = {job: video_file_name(req.names[job[0]], job, req.vbench) for job in jobs}
    if len(set(files.values())) != len(files):
        raise ForcelabError("two videos would get the same file name (repeated prompts with --vbench?)")
    check_existing(req.output, list(files.values()), req.overwrite)
    dtype = DTYPES[req.dtype or ("bf16" if req.device.type == "cuda" else "fp32")]
    check_size(config, ae, req.plan, min(req.batch, len(jobs)), geometry.height, geometry.width,
               geometry.frames, geometry.latent, req.device, dtype)

    from ..models.dit import CausalDiT

    model = CausalDiT.from_pretrained(dit_dir, dtype=dtype, device=req.device)
    settings = _settings(req, config, fmt, ae, te, geometry, cond, dtype)
    return _sample(req, model, ae, te, geometry, jobs, files, settings)


def _load_encoders(req: Request, config, dit_dir: Path, folders: list[Path]):
    """The autoencoder and text encoder of the request, checked against the DiT's shapes."""
    from ..models.autoencoder import load_autoencoder
    from ..models.config import DiTConfig
    from ..models.text_encoder import load_text_encoder
    from ..run_folder import recorded_encoders

    toy = DiTConfig.preset("toy")
    toy_shape = (config.in_channels, config.text_dim) == (toy.in_channels, toy.text_dim)
    hint = "; the model has the toy preset's shape" if toy_shape else ""
    recorded = recorded_encoders(dit_dir) or {}
    vae_spec = resolve_encoder(req.vae, folders, "vae", "--vae", hint, recorded.get("vae"))
    te_spec = resolve_encoder(req.text_encoder, folders, "text_encoder", "--text-encoder", hint,
                              recorded.get("text_encoder"))
    ae = load_autoencoder(vae_spec, device=req.device)
    te = load_text_encoder(te_spec, device=req.device)
    if ae.latent_channels != config.in_channels:
        raise ForcelabError(f"autoencoder {ae.name} gives {ae.latent_channels} latent channels, the DiT "
                            f"takes {config.in_channels}: pass the matching --vae")
    if te.dim != config.text_dim or te.max_length > config.text_len:
        raise ForcelabError(f"text encoder {te.name} gives [{te.max_length}, {te.dim}] embeddings, the DiT "
                            f"takes at most [{config.text_len}, {config.text_dim}]: pass the matching --text-encoder")
    return ae, te


@dataclass
class Geometry:
    """The video's size in pixels and latents, its prefix and where its switches go."""
    height: int
    width: int
    frames: int                          # video frames, prefix included
    latent: int                          # latent frames
    unit: int                            # latent frames that advance together (a chunk or block)
    prefix_pixels: torch.Tensor | None   # [1, 3, n, H, W] in [-1, 1]
    prefix_latent: int                   # latent frames of the prefix
    switch_at: list[tuple[int, int, str]]  # (latent frame, video frame, prompt)


def _geometry(req: Request, config, ae, cond: PrefixInput | None) -> Geometry:
    from ..models.autoencoder import latent_frames as to_latent, pixel_frames

    default_size = cond.size if cond else TOY_SIZE if ae.name.startswith("toy") else WAN_SIZE
    height, width = req.height or default_size[0], req.width or default_size[1]
    cell = ae.spatial_stride * max(config.patch_size[1:])
    if cond:
        cond.check_size(height, width, cell, resized=req.height is not None or req.width is not None)
    if height % cell or width % cell:
        raise ForcelabError(f"--height/--width {height}x{width} must be multiples of {cell} "
                            f"(autoencoder stride {ae.spatial_stride} x patch {config.patch_size[1:]})")
    chunk = 1 if req.teacher else cache_options(req.plan, config)[0]
    unit = 1 if req.teacher else req.plan.unit_frames(chunk)
    frames = req.frames or pixel_frames(ae, -(-DEFAULT_LATENT_FRAMES // unit) * unit)
    latent = to_latent(ae, frames)
    if frames < 1 or pixel_frames(ae, latent) != frames or latent % unit:
        good = [pixel_frames(ae, k * unit) for k in range(1, EXAMPLE_FRAME_COUNTS + 1)]
        raise ForcelabError(f"--frames {frames}: the {req.plan.name} plan needs a whole number of "
                            f"{unit}-latent-frame chunks (stride {ae.temporal_stride}): e.g. {good}")
    prefix_px, p = (None, 0) if cond is None else cond.read(ae, unit, (height, width), latent, frames)
    switch_at = [(latent_switch_frame(f, ae.temporal_stride, unit, latent), f, t) for f, t in req.switches]
    return Geometry(height, width, frames, latent, unit, prefix_px, p, switch_at)


def _settings(req: Request, config, fmt: str, ae, te, g: Geometry, cond: PrefixInput | None, dtype) -> dict:
    """The sidecar's record of every setting shared by the videos of this call."""
    return dict(model=str(req.model), model_format=fmt, model_config=dataclasses.asdict(config),
                vae=ae.name, text_encoder=te.name, plan=req.plan.describe(), frames=g.frames,
                latent_frames=g.latent, height=g.height, width=g.width, fps=req.fps, batch=req.batch,
                negative_prompt=req.negative_prompt if req.teacher else None,
                switches=[dict(frame=f, latent_frame=lf, prompt=t, mode=req.switch_mode,
                               recache_frames=req.recache_frames, rope_jump=req.rope_jump)
                          for lf, f, t in g.switch_at],
                device=str(req.device), dtype=str(dtype).replace("torch.", ""), vbench=req.vbench,
                conditioning=None if cond is None else dict(cond.describe(ae, g.unit),
                                                            prefix_latent_frames=g.prefix_latent),
                vbench_suite=req.vbench_suite, samples=req.samples)


def _sample(req: Request, model, ae, te, g: Geometry, jobs: list[tuple[int, int]], files: dict,
            settings: dict) -> list[GeneratedVideo]:
    """Roll out the jobs in batches, decode as the chunks come, write each video and sidecar."""
    from .. import __version__

    device, n_prefix = req.device, g.prefix_latent
    neg = te.encode([req.negative_prompt])[0].to(device) if req.teacher else None
    sw_emb = [te.encode([t])[0].to(device) for _, _, t in g.switch_at]
    prefix = None if g.prefix_pixels is None else ae.encode(g.prefix_pixels.to(device)).float()
    lat_h, lat_w = g.height // ae.spatial_stride, g.width // ae.spatial_stride
    clean_stale(req.output)  # temporaries of an earlier run that was killed while writing a video
    bar = progress_bar(total=len(jobs) * g.latent, unit="frame", desc="generate", disable=req.progress is False)
    written = []
    with torch.no_grad():
        for b0 in range(0, len(jobs), req.batch):
            batch = jobs[b0:b0 + req.batch]
            seeds = [req.seed + i for _, i in batch]
            ctx = te.encode([req.texts[k] for k, _ in batch])[0].to(device)
            n = len(batch)
            noise = Noise(seeds, model.config.in_channels, lat_h, lat_w, device=device)
            switches = [Switch(lf, e.expand(n, -1, -1), mode=req.switch_mode, recache_frames=req.recache_frames,
                               rope_jump=req.rope_jump) for (lf, _, _), e in zip(g.switch_at, sw_emb)]
            decoder, pixels, t0 = ae.decode_stream(), [], time.perf_counter()
            given = None if prefix is None else prefix.expand(n, -1, -1, -1, -1)
            if given is not None:   # the video starts with the given frames (decoded)
                pixels.append(decoder.push(given).float().cpu())
                bar.update(n_prefix * n)
            for chunk_out in stream(model, req.plan, ctx, noise, g.latent - n_prefix, switches=switches,
                                    prefix=given, negative=None if neg is None else neg.expand(n, -1, -1)):
                pixels.append(decoder.push(chunk_out.x).float().cpu())
                bar.update(chunk_out.x.shape[2] * n)
            seconds = time.perf_counter() - t0
            video = torch.cat(pixels, dim=2)
            for j, (k, i) in enumerate(batch):
                path = req.output / files[(k, i)]
                side = dict(video=path.name, prompt=req.names[k], prompt_text=req.texts[k], sample=i,
                            seed=seeds[j], seconds_per_batch=round(seconds, 3), forcelab=__version__, **settings)
                write_video_and_sidecar(path, video[j], req.fps, side, overwrite=req.overwrite)
                written.append(GeneratedVideo(path, side))
    bar.close()
    return written
