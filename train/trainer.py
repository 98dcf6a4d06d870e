"""The Trainer: one plain loop on accelerate that every recipe (train/, distill/) runs on.

    trainer = Trainer(cfg, resume="latest")
    trainer.run()

Per step, each trainable role whose update_every divides the step index takes one optimizer
step (in the recipe's role order): gradient_accumulation_steps micro-batches, each
`recipe.loss(role, batch, ctx)` under autocast, backward of loss / accumulation; then the
gradients are averaged over processes, checked (non-finite: the update is skipped and
counted; max_nonfinite_steps in a row abort the run, naming the last checkpoint whose weights
and loss were finite), clipped, applied; then the LR schedule and the EMA. Checkpoints every
`checkpoint.every` steps (train/checkpoint.py).

The run folder has one writer: rank 0 holds its lock (locks.lock_folder) from the constructor
to the end of run(), and a resume is verified (train/checkpoint.verify_checkpoint) under that
lock, before anything is built or written.

Data-parallel: every process holds the whole model and the trainer all-reduces gradients
once per optimizer step (after accumulation). This is DDP's arithmetic without DDP's
forward hooks, which the recipes' multi-pass rollouts (several forwards, KV caches, no-grad
passes) would trip over.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from .. import __version__
from ..errors import ConfigError, ForcelabError
from ..fsio import LOCK, MARKER, check_kind, check_output_dir, mark, os_error_message, write_text_atomic
from ..locks import lock_folder
from ..models.autoencoder import latent_frames, load_autoencoder
from ..models.text_encoder import load_text_encoder
from ..run_folder import RUN_RECORD, is_sharded
from ..seeds import mix_seed
from . import checkpoint as ckpt_io
from .config import config_dict, config_yaml
from .data import ShardStream, make_stream, to_device
from .metrics import MetricsLogger, read_scalars
from .parallel import leave_process_group_at_exit, make_strategy
from .recipe import StepContext, recipe_class
from .roles import Role, build_role, ema_copy, make_optimizer, resolve_init, update_ema
from .run_context import RunContext

RUN_KIND = "training"     # what a run folder's marker records
SAMPLE_FPS = 8.0            # frame rate of the sample videos (run_dir/samples/)


class TrainingAborted(ForcelabError):
    """The run stopped itself (too many non-finite steps); the last good checkpoint is kept."""


def encoder_spec(spec: str) -> str:
    """An encoder spec as recorded in a run: 'toy...' as is, a directory as an absolute path."""
    return spec if spec == "toy" or spec.startswith("toy:") else str(Path(spec).expanduser().resolve())


class Trainer:
    def __init__(self, cfg, *, resume: str | None = None, dry_run: bool = False, accelerator=None):
        from accelerate import Accelerator

        self.cfg, self.dry_run = cfg, dry_run
        # autocast is ours (torch.autocast): accelerate's process-wide state cannot change
        # precision between runs in one process (tests, the demo)
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.device, self.rank, self.world = self.acc.device, self.acc.process_index, self.acc.num_processes
        self.is_main = self.acc.is_main_process
        if self.world > 1:
            leave_process_group_at_exit()
        self.parallel = make_strategy(cfg, self.acc)    # ddp | fsdp | zero2 | zero3 (train/parallel.py)
        self.checkpoint_format = ckpt_io.checkpoint_format(cfg, self.parallel)   # full | sharded
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.threads or 1)   # see README: a shared CPU otherwise slows many-fold
        elif cfg.threads:
            torch.set_num_threads(cfg.threads)
        self._tmp = tempfile.TemporaryDirectory(prefix="forcelab-dry-run-") if dry_run else None
        self.run_dir = Path(self._tmp.name) if dry_run else Path(cfg.output_dir).expanduser()
        self.resume_from, self._lock, self._resume_asked = None, None, resume
        self.recipe_cls = recipe_class(cfg.recipe)
        try:
            self._setup(cfg, resume)
        except BaseException:
            self.release()
            raise

    def _setup(self, cfg, resume: str | None) -> None:
        unknown = sorted(set(cfg.roles) - set(self.recipe_cls.roles))
        if unknown:
            raise ConfigError(f"roles: recipe '{cfg.recipe}' has no role(s) {unknown}; its roles are "
                              f"{list(self.recipe_cls.roles)}")
        if not self.dry_run:
            self._prepare_run_dir(resume)     # the lock, the checkpoint to resume, verified
        self.codec = load_autoencoder(cfg.vae, device=self.device)
        self.text_encoder = load_text_encoder(cfg.text_encoder, device=self.device)
        state = ckpt_io.read_trainer_state(self.resume_from) if self.resume_from else None   # verified by rank 0
        self.roles: dict[str, Role] = self._build_roles()
        self.negative = self.text_encoder.encode([cfg.negative_prompt])[0].to(self.device)
        self.recipe = self.recipe_cls(cfg, self.recipe_context())
        self.stream = self.recipe.make_stream() or make_stream(cfg, self.recipe.data_kind(), self.codec,
                                                               self.text_encoder)
        self.step, self.micro_batches, self.nonfinite = 0, 0, 0
        if state is not None:
            self._load_state(state)
        else:
            torch.manual_seed(mix_seed(cfg.seed, self.rank))
        self.recipe.setup()
        if state is not None and self._recipe_state is not None:
            self.recipe.load_state_dict(self._recipe_state)
        self.log = MetricsLogger(self.run_dir, cfg, self.is_main and not self.dry_run, config_dict(cfg), self.step)
        if self.is_main and not self.dry_run and self.resume_from is not None:
            self._write_run_files()           # the resumed run's config, once the resume is verified

    # ------------------------------------------------------------------ setup
    def _prepare_run_dir(self, resume: str | None) -> None:
        """Rank 0 alone checks and makes the run folder, takes its lock, finds and verifies the
        checkpoint to resume; the other ranks take its verdict.

        A rank that looked for itself could catch the folder half made by rank 0 (the marker
        written, the run record not yet) and stop with "not written by forcelab". The
        broadcast is also the barrier: no rank goes on before the folder is complete, and an
        error stops every rank with the same message instead of leaving some waiting. Only
        rank 0 holds the lock, so the ranks of one run never wait for each other."""
        error, found = None, None
        if self.is_main:
            try:
                found = self._make_run_dir(resume)
            except ForcelabError as e:
                error = e
            except OSError as e:
                error = ConfigError(os_error_message(e, "output_dir", self.run_dir))
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            message, found = broadcast_object_list([None if error is None else str(error), found])
            if error is None and message is not None:
                error = ConfigError(message)
        if error is not None:
            raise error
        self.resume_from = None if found is None else Path(found)

    def _make_run_dir(self, resume: str | None) -> str | None:
        """Rank 0: check the folder (new, or a forcelab run resumed), lock it, find and verify
        the checkpoint to resume (under the lock: no other run changes it meanwhile); write
        the marker, and the run record and config of a new run. Returns the checkpoint."""
        d = check_output_dir(self.run_dir, "output_dir")
        check_kind(d, RUN_KIND, "output_dir")
        explicit = ckpt_io.find_checkpoint(d, resume) if resume not in (None, "latest") else None
        if d.is_dir() and [p for p in d.iterdir() if p.name not in (MARKER, LOCK)]:
            if not (d / RUN_RECORD).is_file():
                raise ConfigError(f"output_dir {d}: exists and was not written by forcelab; choose a new folder")
        d.mkdir(parents=True, exist_ok=True)
        self._lock = lock_folder(d, "output_dir")
        found = explicit or (ckpt_io.find_checkpoint(d, resume) if resume == "latest" else None)
        if found is None and ckpt_io.checkpoints(d):
            raise ConfigError(f"output_dir {d}: holds checkpoints of an earlier run; pass --resume latest "
                              f"to continue it, or choose another output_dir")
        if found is not None:
            ckpt_io.verify_checkpoint(found, recipe=self.cfg.recipe, world=self.world,
                                      trainable=self._expected_architectures(), parallel=self.parallel.name)
        mark(d, RUN_KIND)
        if found is None or not (d / RUN_RECORD).is_file():
            self._write_run_files()
        return None if found is None else str(found)

    def _write_run_files(self) -> None:
        d = self.run_dir
        record = {"recipe": self.cfg.recipe, "vae": encoder_spec(self.cfg.vae),
                  "text_encoder": encoder_spec(self.cfg.text_encoder), "forcelab": __version__}
        try:
            write_text_atomic(d / RUN_RECORD, json.dumps(record, indent=2) + "\n", what="output_dir")
            write_text_atomic(d / "config.yaml", config_yaml(self.cfg), what="output_dir")
        except OSError as e:
            raise ConfigError(os_error_message(e, "output_dir", d)) from None

    def _expected_architectures(self) -> dict:
        """Each role this run trains -> the architecture a fresh start would build (its init's
        weights, else the configured preset and overrides): a resumed checkpoint must hold it."""
        from ..models.config import DiTConfig
        from .config import RoleConfig
        from .roles import _checked_config

        out = {}
        for name, spec in self.recipe_cls.roles.items():
            rcfg = self.cfg.roles.get(name) or RoleConfig()
            if not (spec.trainable if rcfg.trainable is None else rcfg.trainable):
                continue
            weights, _ = self._init_source(name)
            overrides = dict(self.cfg.model_overrides)
            if weights is not None:
                out[name] = _checked_config(name, weights, rcfg, overrides)
            else:
                out[name] = DiTConfig.preset(rcfg.preset or self.cfg.model_preset, **overrides)
        return out

    def release(self) -> None:
        """Free the run folder's lock (rank 0); run() takes it again when called once more."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _relock(self) -> None:
        """run() after an earlier run() of this trainer: hold the folder again (rank 0)."""
        error = None
        if self.is_main and not self.dry_run and self._lock is None:
            try:
                self._lock = lock_folder(self.run_dir, "output_dir")
            except ForcelabError as e:
                error = str(e)
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            error = broadcast_object_list([error])[0]
        if error is not None:
            raise ConfigError(error)

    def _init_source(self, name: str) -> tuple[Path | None, str | None]:
        """(weights dir, description) for a role: its own init, else the role it inits from."""
        return resolve_init(self.cfg, self.recipe_cls.roles, name)

    def _build_roles(self) -> dict[str, Role]:
        roles = {}
        for index, (name, spec) in enumerate(self.recipe_cls.roles.items()):
            weights, source = self._init_source(name)
            rcfg = self.cfg.roles.get(name)
            trainable = spec.trainable if rcfg is None or rcfg.trainable is None else rcfg.trainable
            resumed = self.resume_from is not None and trainable
            if resumed and not is_sharded(self.resume_from):
                weights, source = self.resume_from / name, f"resume:{self.resume_from}"
            role = build_role(name, spec, self.cfg, index, self.device, weights, source,
                              defer_loading=self.parallel.loads_rank_local)
            if resumed:      # a sharded checkpoint's weights are read once the role is sharded
                role.source = f"resume:{self.resume_from}"
            self._check_encoders(role)
            self.recipe_cls.prepare_role(self.cfg, role)
            self.parallel.prepare(role)
            if role.trainable:
                make_optimizer(role, self.cfg.max_steps)
                self.parallel.attach_optimizer(role)
                if self.resume_from is not None:
                    ckpt_io.load_role_state(self.resume_from, role, self.parallel)
            roles[name] = role
        return roles

    def _check_encoders(self, role: Role) -> None:
        c = role.module.config
        if c.in_channels != self.codec.latent_channels:
            raise ConfigError(f"roles.{role.name}: the model takes {c.in_channels} latent channels, vae "
                              f"'{self.cfg.vae}' gives {self.codec.latent_channels}; set vae to the model's codec")
        if c.text_dim != self.text_encoder.dim:
            raise ConfigError(f"roles.{role.name}: the model takes text of width {c.text_dim}, text_encoder "
                              f"'{self.cfg.text_encoder}' gives {self.text_encoder.dim}")

    def _load_state(self, state: dict) -> None:
        self.step, self.micro_batches = int(state["step"]), int(state["micro_batches"])
        self.nonfinite = int(state.get("nonfinite", 0))
        self.sample_offset = int(state.get("sample_offset", 0))
        if int(state["world_size"]) != self.world:     # a sharded checkpoint, resharded (train/checkpoint.py)
            self._reshard(int(state["world_size"]))
            return
        rank_state = ckpt_io.load_rank_state(self.resume_from, self.rank)
        ckpt_io.set_rng_state(rank_state["rng"])
        self._recipe_state = rank_state.get("recipe")
        self.parallel.load_rank_state(self.roles, rank_state)
        if isinstance(self.stream, ShardStream):
            self.stream.skip(int(rank_state.get("shard_batches", 0)))

    def _reshard(self, saved_world: int) -> None:
        """Resume at another number of processes: the data continues at the same global sample;
        what belonged to one process alone (RNG, the recipe's per-rank state, a shard stream's
        read count) starts fresh."""
        consumed = self.sample_offset + self.micro_batches * saved_world * self.cfg.data.batch_size
        self.micro_batches, self.sample_offset = ckpt_io.resharded_position(consumed, self.world,
                                                                             self.cfg.data.batch_size)
        torch.manual_seed(mix_seed(self.cfg.seed, self.rank, self.step))
        self._recipe_state = self.recipe.shared_state(ckpt_io.load_rank_state(self.resume_from, 0).get("recipe") or {})
        self._resharded = (f"resharded: checkpoint of {saved_world} process(es) resumed by {self.world}; the data "
                           f"continues at sample {consumed}; RNG, per-process recipe state and shard read counts "
                           f"start fresh")

    _recipe_state = None
    sample_offset = 0         # samples read before micro-batch 0 of this world size (a resharded resume)
    _resharded = None         # the line a resharded resume logs
    _ran = False              # run() was called before (and released the folder's lock)
    _gathered: dict = {}      # sharded runs: full copies of the roles for sampling (rank 0)

    def autocast(self):
        """bf16 autocast when mixed_precision is bf16 (weights and optimizer stay fp32)."""
        if self.cfg.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # ------------------------------------------------------------------ what recipes see
    def recipe_context(self) -> RunContext:
        """The recipe's narrow view of this run (recipes never see the trainer itself)."""
        return RunContext(roles=self.roles, sampling=self.sampling_module, codec=self.codec,
                          text_encoder=self.text_encoder, negative=self.negative, device=self.device,
                          rank=self.rank, world=self.world, dry_run=self.dry_run, run_dir=self.run_dir,
                          resume_from=self.resume_from, barrier=self.acc.wait_for_everyone,
                          data_stream=lambda kind: make_stream(self.cfg, kind, self.codec, self.text_encoder))

    def model(self, role: str) -> torch.nn.Module:
        return self.roles[role].model

    def module(self, role: str):
        return self.roles[role].module

    def sampling_module(self, role: str = "generator"):
        """The role's weights for sampling: its EMA when kept (a copy), else the module."""
        r = self.roles[role]
        if role in self._gathered:
            return self._gathered[role]
        return r.module if r.ema is None else ema_copy(r.module, r.ema)

    def next_batch(self) -> tuple[dict, list[int]]:
        """This rank's next micro-batch and its samples' global positions."""
        B = self.cfg.data.batch_size
        first = self.sample_offset + (self.micro_batches * self.world + self.rank) * B
        positions = list(range(first, first + B))
        self.micro_batches += 1
        return to_device(self.stream.batch(positions), self.device), positions

    # ------------------------------------------------------------------ the loop
    def run(self, stop_at: int | None = None) -> dict:
        """Train to max_steps (or stop after step `stop_at`, e.g. to hand over to a resume)."""
        cfg, last = self.cfg, {}
        end = cfg.max_steps if stop_at is None else min(stop_at, cfg.max_steps)
        if self.step >= cfg.max_steps:
            self.log.write(f"nothing to do: the run is at step {self.step} of max_steps={cfg.max_steps}")
        if self.resume_from is not None:
            self.log.write(f"resumed from {self.resume_from} at step {self.step}")
            if self._resharded:
                self.log.write(self._resharded)
        elif self._resume_asked == "latest" and not self.dry_run and not self._ran:
            self.log.write(f"--resume latest: {self.run_dir} holds no checkpoint yet; starting a new run at step 0")
        t0 = time.perf_counter()
        try:
            if self._ran and not self.dry_run:   # an earlier run() released the folder
                self._relock()
            self._ran = True
            self.log.write(self.parallel.describe())     # strategy, world size, global batch
            while self.step < end:
                metrics = self.train_step()
                self.step += 1
                for role in self.roles.values():
                    if role.trainable and f"{role.name}/loss" in metrics and f"{role.name}/skipped" not in metrics:
                        update_ema(role, self.step, self.parallel.ema_source(role))
                last = metrics
                if self.dry_run:
                    return self._report_dry_run(metrics, time.perf_counter() - t0)
                self.log.log(self.step, metrics)
                if cfg.logging.sample_every and self.step % cfg.logging.sample_every == 0:
                    self.write_samples(self.step)
                due = (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or self.step == cfg.max_steps
                if due and self.nonfinite:   # mid-streak: keep the older, good checkpoints
                    self.log.write(f"step {self.step}: checkpoint postponed ({self.nonfinite} non-finite updates in a row)")
                elif due:
                    self.save()
            if self.is_main:
                self._summary(time.perf_counter() - t0)
        finally:
            self.log.close()
            self.release()
        return last

    def _summary(self, seconds: float) -> None:
        """The end of a run: what it did, where its outputs are, how to use them."""
        losses = ", ".join(f"{k} {v:.4g} (step {s})" for k, (v, s) in self.log.latest.items())
        ckpts = ckpt_io.checkpoints(self.run_dir)
        samples = self.run_dir / "samples"
        toy = self.cfg.vae.startswith("toy")
        lines = [f"finished: step {self.step} of {self.cfg.max_steps} in {seconds:.0f} s"
                 + (f"; latest losses: {losses}" if losses else ""),
                 f"run folder: {self.run_dir}"
                 + (f" (last checkpoint {ckpts[-1].name})" if ckpts else " (no checkpoint yet)")]
        if samples.is_dir():
            lines.append(f"sample videos: {samples}")
        lines.append(f"generate: forcelab generate {self.run_dir} --prompt \"...\" --output {self.run_dir / 'videos'}")
        if toy:
            lines.append(f"evaluate: forcelab eval toybench {self.run_dir / 'videos'}")
        for line in lines:
            self.log.write(line)

    def train_step(self) -> dict:
        metrics = {}
        for name, role in self.roles.items():
            if role.trainable and self.step % role.cfg.update_every == 0:
                metrics.update(self._update(role))
        return metrics

    def _update(self, role: Role) -> dict:
        A = self.cfg.gradient_accumulation_steps
        for other in self.roles.values():   # e.g. SiD's generator loss also reaches the critic
            if other.trainable:
                self.parallel.zero_grad(other)
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        logs: dict[str, torch.Tensor | float] = {}
        for micro in range(A):
            batch, positions = self.next_batch()
            ctx = StepContext(self.step, micro, self.cfg.seed, positions, self.device, role=role.name)
            with self.autocast():
                loss, extra = self.recipe.loss(role.name, batch, ctx)
            self.parallel.before_backward(role, last_micro=micro == A - 1)
            self.parallel.backward(role, loss / A)
            total += loss.detach().double() / A
            for k, v in extra.items():
                logs[k] = logs.get(k, 0.0) + (v.detach().double() if torch.is_tensor(v) else v) / A
        self._all_reduce_grads(role)
        finite = torch.isfinite(total).float()
        grads = [p.grad for p in role.params if p.grad is not None]
        clip = role.cfg.grad_clip if role.cfg.grad_clip is not None else math.inf
        norm = self.parallel.clip_grad_norm(role, clip) if grads else torch.zeros(())
        finite = finite * torch.isfinite(norm).float()
        if self.world > 1:
            stats = torch.stack([total, finite.double()]).to(self.device)
            torch.distributed.all_reduce(stats)
            total, finite = stats[0] / self.world, stats[1] / self.world
        # the update's one host read: the skip decision and every logged value together
        total, norm, finite, logs = read_scalars(total, norm, finite, logs)
        out = {f"{role.name}/loss": total, f"{role.name}/grad_norm": norm,
               f"{role.name}/lr": role.scheduler.get_last_lr()[0]}
        out.update({f"{role.name}/{k}": v for k, v in logs.items()})
        if finite < 1.0:
            return self._skip(role, out, total)
        applied, stepped_norm = self.parallel.step(role)   # DeepSpeed measures (and clips) inside its step
        if stepped_norm is not None:
            out[f"{role.name}/grad_norm"] = stepped_norm
        if not applied:   # DeepSpeed's own check: a non-finite gradient behind a finite loss
            return self._skip(role, out, total)
        self.nonfinite = 0
        role.scheduler.step()
        self.parallel.zero_grad(role)
        role.updates += 1
        return out

    def _skip(self, role: Role, out: dict, loss: float) -> dict:
        """A non-finite update not taken: the weights, LR schedule, EMA and update count stay;
        max_nonfinite_steps of them in a row end the run."""
        self.parallel.zero_grad(role)
        self.nonfinite += 1
        out[f"{role.name}/skipped"] = 1.0
        self.log.write(f"step {self.step + 1}: non-finite {role.name} loss or gradient - update skipped "
                       f"({self.nonfinite} in a row)")
        if self.nonfinite >= self.cfg.max_nonfinite_steps:
            good, bad = (None, []) if self.dry_run else ckpt_io.last_good_checkpoint(self.run_dir, self.step + 1)
            keep = (f"the last good checkpoint (finite weights and loss) is {good}" if good else
                    "no checkpoint with finite weights and loss was written")
            keep += f" ({'; '.join(bad)})" if bad else ""
            raise TrainingAborted(f"{self.nonfinite} non-finite updates in a row at step {self.step + 1} "
                                  f"({role.name} loss {loss:.4g}); {keep}; lower the learning "
                                  f"rate or check the data, then resume from it")
        return out

    def _all_reduce_grads(self, role: Role) -> None:
        """Average gradients over processes, in flat buckets (one collective per bucket)."""
        if self.world == 1 or self.parallel.reduces_grads(role):
            return
        grads = [p.grad for p in role.params if p.grad is not None]
        bucket, size, limit = [], 0, 25 * 2 ** 20
        for g in grads + [None]:
            if g is not None:
                bucket.append(g)
                size += g.numel() * g.element_size()
            if bucket and (g is None or size >= limit):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                torch.distributed.all_reduce(flat)
                flat /= self.world
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket, size = [], 0

    # ------------------------------------------------------------------ outputs
    def trainer_state(self) -> dict:
        return {"step": self.step, "micro_batches": self.micro_batches, "sample_offset": self.sample_offset,
                "nonfinite": self.nonfinite, "world_size": self.world, "format": self.checkpoint_format,
                "recipe": self.cfg.recipe, "seed": self.cfg.seed,
                "roles": {n: {"source": r.source, "updates": r.updates, "trainable": r.trainable}
                          for n, r in self.roles.items()},
                "forcelab": __version__}

    def save(self) -> Path:
        """Collective: every rank writes its own state (and, sharded, its own shards) into the
        checkpoint; an error on any rank stops every rank with the same line."""
        rank_state = {"rng": ckpt_io.rng_state(), "recipe": self.recipe.state_dict(),
                      **self.parallel.rank_state(self.roles)}
        if isinstance(self.stream, ShardStream):
            rank_state["shard_batches"] = self.stream.read
        trainable = {n: r for n, r in self.roles.items() if r.trainable}
        shards = snapshots = None
        if self.checkpoint_format == "sharded":
            shards = {n: self.parallel.checkpoint_shards(r) for n, r in trainable.items()}
        elif self.parallel.sharded:    # collective: full weights / optimizer state on rank 0
            snapshots = {n: self.parallel.snapshot(r) for n, r in trainable.items()}
        path = ckpt_io.save_checkpoint(self.run_dir, self.step, self.roles, self.trainer_state(), rank_state,
                                       config_yaml(self.cfg), self.cfg.checkpoint.keep_last, rank=self.rank,
                                       world=self.world, snapshots=snapshots, shards=shards)
        self.log.write(f"saved {path}")
        return path

    def sample_prompts(self) -> list[str]:
        return list(self.cfg.logging.sample_prompts) or self.stream.captions(2) or ["a red ball"]

    @torch.no_grad()
    def write_samples(self, step: int) -> list[Path]:
        """Sample videos of the generator (EMA when kept) into run_dir/samples/step-NNNNNN/."""
        if self.parallel.sharded:   # collective: full copies of the sharded roles on rank 0
            self._gathered = {n: self.parallel.full_module(r, use_ema=True)
                              for n, r in self.roles.items() if r.trainable}
        if not self.is_main:
            return []
        from ..generate.writer import write_video_and_sidecar

        prompts = self.sample_prompts()
        emb = self.text_encoder.encode(prompts)[0].to(self.device)
        frames = latent_frames(self.codec, self.cfg.data.frames or 16)
        latents = self.recipe.sample(emb, list(range(len(prompts))), frames)
        video = self.codec.decode(latents).float().cpu()
        out = self.run_dir / "samples" / f"step-{step:06d}"
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ForcelabError(os_error_message(e, "samples", out)) from None
        paths = []
        for i, prompt in enumerate(prompts):
            path = out / f"{i:02d}.mp4"
            write_video_and_sidecar(path, video[i], SAMPLE_FPS, {"prompt": prompt, "step": step, "seed": i},
                                    what="samples")
            self.log.log_video(step, f"sample/{i}", path, caption=prompt)
            paths.append(path)
        self._gathered = {}   # stale after the next update
        return paths

    def _report_dry_run(self, metrics: dict, seconds: float) -> dict:
        if self.is_main:
            lines = ["dry run: built everything and ran one step", f"recipe: {self.cfg.recipe}",
                     f"parallel: {self.parallel.name} over {self.world} process(es)"]
            for name, r in self.roles.items():
                n = sum(getattr(p, "ds_numel", p.numel()) for p in r.module.parameters())   # ZeRO-3: full size
                lines.append(f"role {name}: {n:,} parameters ({'trainable' if r.trainable else 'frozen'}; "
                             f"weights from {r.source})")
            lines.append(f"step time: {seconds:.2f} s; " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            lines.append(f"peak host memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB")
            if torch.cuda.is_available():
                lines.append(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB")
            lines.append("resolved config:")
            lines.append(config_yaml(self.cfg))
            print("\n".join(lines), file=sys.stdout, flush=True)
        self._tmp.cleanup()
        return metrics
