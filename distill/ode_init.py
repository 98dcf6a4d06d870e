"""ODE init: regress the causal student onto the teacher's ODE solutions (CausVid, Self-Forcing).

Phase A (setup, unless data.source is a finished pair set): the ODE-pair data stage
(distill/ode_pair_stage.py: once, resumable, split over ranks): the frozen bidirectional
teacher samples `num_pairs` clips with the Teacher plan through the rollout engine (CFG with
the negative prompt), and the latents at a few chosen solver states - the starting noise
first, the clean output last - are stored as ODE-pair shards (data/ode_pairs.py) in
`pairs_dir`. Pair i's noise and prompt depend only on (seed, i): the set does not depend on
the number of processes.

Causal ODE pairs (Causal Forcing, `teacher_kind: causal`): the teacher is an autoregressive
diffusion model (a diffusion-forcing or teacher-forcing run, train/diffusion_forcing.py) and
samples each clip chunk by chunk with its KV cache through the same engine (the chunk-wise plan
with Euler steps over the same levels; each finished chunk committed clean, at t = 0, as the
context of the next): the pairs then follow a causal trajectory, which a causal student can
follow, instead of a bidirectional one, whose later frames shape the earlier ones (the cause of
the discontinuities at chunk boundaries that bidirectional ODE init leaves). The causal teacher
samples without CFG (teacher_guidance 1; a teacher-forcing run trained without caption dropout
has no unconditional branch). Its chunk: teacher_chunk_frames (None: the one it was trained
with), so a frame-wise student (chunk_frames 1) can regress a chunk-wise teacher's pairs.

Phase B (the loss): per sample, every chunk picks one stored state uniformly (stream
"stored_state"); the causal student sees each chunk at its own stored latent under the block-causal layout (one forward
over the clip; later chunks attend to earlier chunks at their chosen levels), predicts
x0 = x_t - sigma * v and regresses the stored clean latent (MSE). Chunks that picked the
clean state (t = 0) are context only: masked out of the loss.

Stored levels vs the student's denoising list: the student learns x0 at the stored levels,
so its sampling list should be those levels (CausVid: 50 steps, indices [0, 36, 44, -1]
store t ~ [1000, 757, 522, 0], exactly its list [1000, 757, 522]). Self-Forcing stores
indices [0, 12, 24, 36, -1] of 48 steps with shift 8, t ~ [1000, 960, 888.9, 727.3, 0],
but samples with the warped list [1000, 937.5, 833.3, 625]: levels it never regressed at
(ODE init is only its starting point; the DMD stage trains on its own list). `sample_timesteps`
None samples at the stored levels; set it to reproduce the other choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..dtypes import DTYPES
from ..data.ode_pairs import ODEPairs
from ..data.toyworld import ToyWorld, ToyWorldConfig
from ..errors import ConfigError, ForcelabError
from ..models.autoencoder import latent_frames
from ..models.plans import CausalPlan, Chunkwise, Teacher
from ..models.schedule import SOLVERS, timestep_to_sigma, x0_from_v
from ..train.data import TOYWORLD, MapStream
from ..train.flow_matching import masked_mean
from ..train.recipe import Recipe, RoleSpec
from ..train.timesteps import choose_levels
from ..validate import choice, each, in_range, optional, positive_float, positive_int, setting, unit_interval
from .ode_pair_stage import PAIRS_RECORD, PairJob, kept_levels, write_pairs

TEACHER_KINDS = ("bidirectional", "causal")   # the pair teacher: the Teacher plan, or an AR teacher with its KV cache
CLEAN_CONTEXT = 0.0                 # the causal teacher commits each finished chunk at t = 0 (as it was trained)


@dataclass
class ODEInitOptions:
    # phase A: the pairs (defaults: the public Self-Forcing / CausVid ODE data)
    num_pairs: int = setting(1024, positive_int)    # clips the teacher samples
    pairs_dir: str | None = None        # None: <output_dir>/ode_pairs; a finished set with the same settings is reused
    pairs_per_shard: int = setting(64, positive_int)   # pairs per shard = the unit of resumable work
    pairs_batch: int = setting(1, positive_int)     # clips the teacher samples together
    pairs_dtype: str = setting("bf16", choice, sorted(DTYPES))   # storage dtype of the stored latents
    teacher_steps: int = setting(48, positive_int)  # solver steps
    teacher_shift: float = setting(8.0, positive_float)   # sigma shift of the sampling schedule
    teacher_guidance: float = 6.0       # CFG, uncond + guidance * (cond - uncond) (the public value is in this form)
    teacher_solver: str = setting("euler", choice, SOLVERS)   # euler | unipc (the public pairs: Euler)
    teacher_sigma_max: float = setting(1.0, unit_interval)   # first level before the shift (public pairs: t = 1000)
    stored_steps: list[int] = field(default_factory=lambda: [0, 12, 24, 36, -1])  # solver states kept; -1 = clean
    teacher_kind: str = setting("bidirectional", choice, TEACHER_KINDS)   # bidirectional | causal (Causal Forcing's AR teacher)
    teacher_chunk_frames: int | None = setting(None, optional(positive_int))   # causal teacher: frames per chunk (None: its own)
    # phase B / samples: the student's sampling list (None: the stored levels > 0)
    sample_timesteps: list[float] | None = setting(None, optional(each(in_range, 0, 1000)))

    def check(self, model=None) -> None:
        """Rules across fields (the loader calls this before anything is built): the stored
        steps, the teacher's plan and the student's sampling list."""
        if self.teacher_kind == "causal":
            if self.teacher_guidance != 1.0:
                raise ConfigError(f"algo.teacher_guidance: the causal teacher samples without CFG (its chunks "
                                  f"condition on one prompt through the KV cache); set it to 1, got "
                                  f"{self.teacher_guidance}")
            if self.teacher_solver != "euler":
                raise ConfigError(f"algo.teacher_solver: the causal teacher integrates each chunk with Euler "
                                  f"steps; set it to euler, got {self.teacher_solver!r}")
        elif self.teacher_chunk_frames is not None:
            raise ConfigError("algo.teacher_chunk_frames: only for teacher_kind causal (the bidirectional "
                              "teacher samples the whole clip at once); remove it")
        self.student_list(self.stored_levels(self.teacher_plan()))

    def teacher_plan(self) -> Teacher | CausalPlan:
        """The teacher's sampling plan for the pairs (its own checks named by the config keys):
        the bidirectional Teacher plan, or for a causal teacher the chunk-wise plan with Euler
        steps over the same levels, each chunk committed clean."""
        try:
            if self.teacher_kind == "causal":
                return Chunkwise(timesteps=self.solver_plan().timesteps, update="euler",
                                 context_noise=CLEAN_CONTEXT, chunk_frames=self.teacher_chunk_frames)
            return self.solver_plan()
        except ForcelabError as e:
            raise ConfigError(f"algo.teacher_*: {e}") from None

    def solver_plan(self) -> Teacher:
        """The solver's levels and settings (the bidirectional teacher's whole plan)."""
        return Teacher(steps=self.teacher_steps, shift=self.teacher_shift, solver=self.teacher_solver,
                       guidance=self.teacher_guidance, sigma_max=self.teacher_sigma_max)

    def stored_levels(self, plan: Teacher | CausalPlan) -> list[float]:
        """The timesteps of the stored solver states (the clean output: 0)."""
        return kept_levels(plan, stored_indices(self.stored_steps, self.teacher_steps))

    def student_list(self, levels: list[float]) -> list[float]:
        """The student's sampling list: sample_timesteps, or the stored levels > 0."""
        out = list(self.sample_timesteps) if self.sample_timesteps else [x for x in levels if x > 0]
        try:
            Chunkwise(timesteps=out)
        except ForcelabError as e:
            raise ConfigError(f"algo.sample_timesteps: {e}") from None
        return out


def stored_indices(steps: list[int], solver_steps: int) -> list[int]:
    """Solver-state indices in 0..S (S = solver_steps; -1 = S, the clean output), checked:
    increasing, at least one noisy state, ending with the clean output (the target)."""
    S = solver_steps
    out = []
    for k in steps:
        if int(k) != k or not -(S + 1) <= k <= S:
            raise ConfigError(f"algo.stored_steps: {k} is not a solver state of {S} steps (0..{S}, or -1 for "
                              f"the clean output)")
        out.append(int(k) % (S + 1))
    if len(out) < 2 or out != sorted(set(out)) or out[-1] != S:
        raise ConfigError(f"algo.stored_steps must increase from a noisy state to -1 (the clean output, the "
                          f"regression target), e.g. [0, 12, 24, 36, -1]; got {list(steps)}")
    return out


class PairStream:
    """The pair set as a position-addressed stream (filled by setup once the pairs exist)."""

    def __init__(self, seed: int):
        self.seed, self.maps = seed, None

    def load(self, pairs: ODEPairs) -> None:
        self.maps = MapStream(pairs, self.seed)

    def batch(self, positions: list[int]) -> dict:
        return self.maps.batch(positions)

    def captions(self, n: int) -> list[str]:
        return self.maps.captions(n) if self.maps is not None else []


class ODEInitRecipe(Recipe):
    name = "ode_init"
    starts_from = {"teacher": "teacher"}
    roles = {"generator": RoleSpec(causal=True, init_from="teacher"),
             "teacher": RoleSpec(trainable=False)}
    data = "ode_pairs"
    Options = ODEInitOptions

    def make_stream(self):
        self.stream = PairStream(self.cfg.seed)
        return self.stream

    # ------------------------------------------------------------------ phase A
    def setup(self):
        o, t = self.opt, self.run           # the options were checked when the config loaded
        self.indices = stored_indices(o.stored_steps, o.teacher_steps)
        self.plan = o.teacher_plan()
        self.levels = o.stored_levels(self.plan)
        self.sample_list = o.student_list(self.levels)
        gen = t.module("generator").config
        self.chunk = gen.chunk_frames
        c = t.codec
        self.frames = latent_frames(c, self.cfg.data.frames or ToyWorldConfig.frames)
        if self.frames % self.chunk:
            raise ConfigError(f"ode_init: clips of {self.frames} latent frames are not whole chunks of "
                              f"{self.chunk}; set data.frames so the latent frames divide by chunk_frames")
        if o.teacher_kind == "causal":
            teacher_chunk = self.plan.chunk_frames or t.module("teacher").config.chunk_frames
            if self.frames % teacher_chunk:
                raise ConfigError(f"ode_init: clips of {self.frames} latent frames are not whole chunks of the "
                                  f"causal teacher ({teacher_chunk} frames); set data.frames or "
                                  f"algo.teacher_chunk_frames")
        self.shape = [c.latent_channels, self.frames, self.cfg.data.height // c.spatial_stride,
                      self.cfg.data.width // c.spatial_stride]
        source = Path(self.cfg.data.source).expanduser()
        if self.cfg.data.source != TOYWORLD and (source / PAIRS_RECORD).is_file():
            pairs_dir = source                       # a finished pair set: phase A is done
        else:
            pairs_dir = self.make_pairs()
        pairs = ODEPairs(pairs_dir)
        if len(pairs) == 0:
            raise ConfigError(f"ode_init: no ODE pairs in {pairs_dir}")
        first = pairs[0]
        have = list(first["ode_latents"].shape)
        if have[1] != gen.in_channels or have[2] % self.chunk:
            raise ConfigError(f"ode_init: the pairs in {pairs_dir} have latents {have} ([S, C, F, H, W]); the "
                              f"student takes {gen.in_channels} channels in chunks of {self.chunk} frames")
        self.stream.load(pairs)

    def pair_count(self) -> int:
        """The dry run makes only what one step reads."""
        if self.run.dry_run:
            return min(self.opt.num_pairs, self.cfg.data.batch_size * self.run.world)
        return self.opt.num_pairs

    def pairs_dir(self) -> Path:
        o, t = self.opt, self.run
        if o.pairs_dir is None or t.dry_run:
            return t.run_dir / "ode_pairs"
        return Path(o.pairs_dir).expanduser()

    def settings(self) -> dict:
        o, t = self.opt, self.run
        return {"kind": "ode_pairs", "teacher": t.source("teacher"), "plan": self.plan.describe(),
                "stored_steps": self.indices, "stored_timesteps": self.levels, "num_pairs": self.pair_count(),
                "pairs_per_shard": o.pairs_per_shard, "dtype": o.pairs_dtype, "latent_shape": self.shape,
                "prompts": self.cfg.data.source, "negative_prompt": self.cfg.negative_prompt,
                "seed": self.cfg.seed, "vae": t.codec.name, "text_encoder": t.text_encoder.name}

    def make_pairs(self) -> Path:
        """Generate (or finish) the pair set (the data stage distill/ode_pair_stage.py); every
        rank its pieces; returns the folder."""
        o, t = self.opt, self.run
        job = PairJob(t.module("teacher"), self.plan, self.indices, self.shape, self.prompts(), t.text_encoder,
                      t.negative, seed=self.cfg.seed, count=self.pair_count(), per_shard=o.pairs_per_shard,
                      batch=o.pairs_batch, dtype=o.pairs_dtype, device=t.device)
        return write_pairs(self.pairs_dir(), job, self.settings(), t.rank, t.world, t.barrier,
                           source=t.source("teacher"))

    def prompts(self):
        """Pair i -> its caption: toy world scene i, or line i (cycled) of a prompt source."""
        src = self.cfg.data.source
        if src == TOYWORLD:
            world = ToyWorld(ToyWorldConfig(height=self.cfg.data.height, width=self.cfg.data.width),
                             seed=self.cfg.seed)
            return lambda i: world.scene(i).caption
        path = Path(src).expanduser()
        if not path.exists():
            raise ConfigError(f"data.source: {src} not found; give 'toyworld', a prompt file (.txt/.csv/.jsonl), "
                              f"prompt shards or a folder of ODE pairs")
        from ..data.prompts import PromptDataset

        prompts = PromptDataset(path).prompts
        return lambda i: prompts[i % len(prompts)]

    # ------------------------------------------------------------------ phase B
    def loss(self, role, batch, ctx):
        ode, levels, context = batch["ode_latents"], batch["ode_timesteps"], batch["text_emb"]
        B, S, C, F = ode.shape[:4]
        states = list(range(S))             # one stored state per chunk, uniform, per sample
        idx = ctx.stream("stored_state").per_sample(
            lambda b, generator: choose_levels(states, b, F, self.chunk, generator)).long()
        x_t = ode.gather(1, idx[:, None, None, :, None, None].expand(B, 1, C, F, *ode.shape[4:]))[:, 0]
        t = levels.to(idx.device).float().gather(1, idx)                                            # [B, F]
        model = self.run.model(role)
        cfg = self.run.module(role).config
        v = model(x_t, t, context, chunk_frames=self.chunk, window_frames=cfg.window_frames,
                  sink_frames=cfg.sink_frames)
        x0 = x0_from_v(x_t, v, timestep_to_sigma(t))
        mask = t > 0
        loss = masked_mean((x0.float() - ode[:, -1].float()) ** 2, mask)
        return loss, {"noisy_chunks": mask.float().mean()}

    @classmethod
    def sampling_plan(cls, opt) -> Chunkwise:
        """The chunk-wise few-step plan at the student's list (sample_timesteps, or the stored levels)."""
        return Chunkwise(timesteps=opt.student_list(opt.stored_levels(opt.teacher_plan())))

    @torch.no_grad()
    def sample(self, context, seeds, frames):
        return self.sample_with(self.sampling_plan(self.opt), context, seeds, frames, unit=self.chunk)

