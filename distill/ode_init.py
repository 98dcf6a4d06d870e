"""ODE init: regress the causal student onto the teacher's ODE solutions (CausVid, Self-Forcing).

Phase A (setup; once, resumable, split over ranks): the frozen bidirectional teacher samples
`num_pairs` clips with the Teacher plan through the rollout engine (CFG with the negative
prompt), and the latents at a few chosen solver states - the starting noise first, the clean
output last - are stored as ODE-pair shards (data/ode_pairs.py) in `pairs_dir`. The work is
cut into pieces of `pairs_per_shard` pairs; rank r writes pieces r, r + world, ... into
piece-NNNNNN/ (a piece is done once its manifest.json exists), so a killed run continues
where it stopped. Pair i's noise (stream "ode_pair_noise") and prompt depend only on
(seed, i): the set does not depend on the number of processes. Then a barrier.

Phase B (the loss): per sample, every chunk picks one stored state uniformly (stream
"stored_state"); the causal
student sees each chunk at its own stored latent under the block-causal layout (one forward
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

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import DTYPES
from ..data.ode_pairs import ODEPairs, write_ode_pairs
from ..data.toyworld import ToyWorld, ToyWorldConfig
from ..errors import ConfigError, ForcelabError
from ..fsio import write_text_atomic
from ..models.autoencoder import latent_frames
from ..models.plans import Chunkwise, Teacher
from ..models.rollout import Noise, rollout
from ..models.schedule import SOLVERS, timestep_to_sigma, x0_from_v
from ..train.data import TOYWORLD, MapStream
from ..seeds import stream_seed
from ..train.recipe import Recipe, RoleSpec
from ..train.timesteps import choose_levels
from ..validate import choice, each, in_range, optional, positive_float, positive_int, setting, unit_interval
from ..train.flow_matching import masked_mean

PAIRS_RECORD = "ode-pairs.json"      # settings of a pair set (what makes it reusable)
PIECE_PREFIX = "piece-"
PAIR_NOISE = "ode_pair_noise"        # the random stream of the pairs' starting noise (per pair index)


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
    # phase B / samples: the student's sampling list (None: the stored levels > 0)
    sample_timesteps: list[float] | None = setting(None, optional(each(in_range, 0, 1000)))

    def check(self, model=None) -> None:
        """Rules across fields (the loader calls this before anything is built): the stored
        steps, the teacher's plan and the student's sampling list."""
        self.student_list(self.stored_levels(self.teacher_plan()))

    def teacher_plan(self) -> Teacher:
        """The teacher's sampling plan for the pairs (its own checks named by the config keys)."""
        try:
            return Teacher(steps=self.teacher_steps, shift=self.teacher_shift, solver=self.teacher_solver,
                           guidance=self.teacher_guidance, sigma_max=self.teacher_sigma_max)
        except ForcelabError as e:
            raise ConfigError(f"algo.teacher_*: {e}") from None

    def stored_levels(self, plan: Teacher) -> list[float]:
        """The timesteps of the stored solver states (the clean output: 0)."""
        states = plan.timesteps + [0.0]
        indices = stored_indices(self.stored_steps, self.teacher_steps)
        return [states[k] for k in indices]

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
        """Generate (or finish) the pair set; every rank its pieces; returns the folder."""
        o, t = self.opt, self.run
        out = self.pairs_dir()
        settings = self.settings()
        record = out / PAIRS_RECORD
        if record.is_file():
            try:
                old = json.loads(record.read_text())
            except ValueError:
                old = None
            if old != settings:
                diff = sorted(k for k in settings if not isinstance(old, dict) or old.get(k) != settings[k])
                raise ConfigError(f"algo.pairs_dir {out}: holds ODE pairs made with other settings ({', '.join(diff)}); "
                                  f"choose another pairs_dir (or remove that folder)")
        elif out.is_dir() and any(out.iterdir()):
            raise ConfigError(f"algo.pairs_dir {out}: exists and holds no ODE pairs written by forcelab; "
                              f"choose an empty or new folder")
        t.barrier()
        if t.is_main and not record.is_file():
            out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(record, json.dumps(settings, indent=2) + "\n")
        t.barrier()
        n, size = self.pair_count(), o.pairs_per_shard
        pieces = range(t.rank, -(-n // size), t.world)
        todo = [j for j in pieces if not _piece_done(out / f"{PIECE_PREFIX}{j:06d}", min(size, n - j * size))]
        made, t0 = 0, time.perf_counter()
        for j in todo:
            first = j * size
            count = min(size, n - first)
            write_ode_pairs(out / f"{PIECE_PREFIX}{j:06d}", self.teacher_pairs(first, count),
                            shard_size=count, dtype=o.pairs_dtype, first_index=first)
            made += count
        if made and t.is_main:
            seconds = time.perf_counter() - t0
            print(f"ode_init: {made} ODE pairs on rank 0 in {seconds:.1f} s ({seconds / made:.3f} s per pair) "
                  f"-> {out}", flush=True)
        t.barrier()
        return out

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

    @torch.no_grad()
    def teacher_pairs(self, first: int, count: int):
        """Samples for data/ode_pairs.write_ode_pairs: pairs first .. first + count - 1."""
        o, t = self.opt, self.run
        teacher, caption = t.module("teacher"), self.prompts()
        C, F, h, w = self.shape
        wanted = set(self.indices)
        steps = torch.tensor(self.levels, dtype=torch.float32)
        for b0 in range(first, first + count, o.pairs_batch):
            ids = list(range(b0, min(b0 + o.pairs_batch, first + count)))
            captions = [caption(i) for i in ids]
            emb, lengths = t.text_encoder.encode(captions)
            kept: dict[int, torch.Tensor] = {}

            def keep(k, x):
                if k in wanted:
                    kept[k] = x.detach().float().cpu().clone()

            noise = Noise([stream_seed(self.cfg.seed, PAIR_NOISE, i) for i in ids], C, h, w, device=t.device)
            neg = t.negative.expand(len(ids), -1, -1)
            rollout(teacher, self.plan, emb.to(t.device), noise, F, negative=neg, trajectory=keep)
            latents = torch.stack([kept[k] for k in self.indices], dim=1)       # [B, S, C, F, H, W]
            for b, i in enumerate(ids):
                yield {"ode_latents": latents[b], "ode_timesteps": steps, "text_emb": emb[b].cpu(),
                       "text_len": int(lengths[b]), "caption": captions[b],
                       "meta": {"source": f"ode_pair:{i}", "teacher": t.source("teacher")}}

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
        return loss, {"noisy_chunks": float(mask.float().mean())}

    @torch.no_grad()
    def sample(self, context, seeds, frames):
        """The chunk-wise few-step plan at the student's list (sample_list)."""
        return self.sample_with(Chunkwise(timesteps=self.sample_list), context, seeds, frames, unit=self.chunk)


def _piece_done(folder: Path, count: int) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        return int(manifest["counts"]["written"]) == count
    except (OSError, ValueError, KeyError, TypeError):
        return False
