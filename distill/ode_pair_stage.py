"""ODE pairs as a data stage of their own: the frozen teacher's ODE solutions written as an
ODE-pair set (data/ode_pairs.py), resumable and split over ranks. The ODE-init recipe runs this
stage when its data source is not a finished pair set, then trains on the pairs; any other
caller (a script, another recipe) can run it the same way. The teacher is the bidirectional one
(the Teacher plan) or, for Causal Forcing's causal ODE pairs, an autoregressive one sampling
chunk by chunk with its KV cache (a causal plan with Euler steps): the same engine either way.

    job = PairJob(teacher, plan, indices, shape, caption, text_encoder, negative, seed=0, count=1024)
    folder = write_pairs("data/ode", job, settings, rank=r, world=w, barrier=wait_for_everyone)

The work is cut into pieces of `per_shard` pairs; rank r writes pieces r, r + world, ... into
piece-NNNNNN/ (a piece is done once its manifest.json lists all its pairs), so a killed job
continues where it stopped. Pair i's starting noise (stream "ode_pair_noise") and caption
depend only on (seed, i): the set does not depend on the number of processes. The folder's
settings record (ode-pairs.json) guards a set against being continued with other settings.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..data.ode_pairs import write_ode_pairs
from ..errors import ConfigError
from ..fsio import write_text_atomic
from ..models.plans import CausalPlan, Teacher
from ..models.rollout import Noise, rollout
from ..seeds import stream_seed

PAIRS_RECORD = "ode-pairs.json"      # settings of a pair set (what makes it reusable)
PIECE_PREFIX = "piece-"
PAIR_NOISE = "ode_pair_noise"        # the random stream of the pairs' starting noise (per pair index)


@dataclass
class PairJob:
    """What a pair set is made from."""
    teacher: torch.nn.Module            # the frozen teacher DiT (its plain module)
    plan: Teacher | CausalPlan          # Teacher (bidirectional, CFG with the negative prompt) or a causal
                                        # plan with Euler steps (an AR teacher, chunk by chunk with its KV cache)
    indices: list[int]                  # the solver states kept, increasing, the clean output last
    shape: list[int]                    # latent [C, F, H, W] of a clip
    caption: Callable[[int], str]       # pair index -> its caption
    text_encoder: object
    negative: torch.Tensor              # the negative prompt's embedding [1, L, D]
    seed: int = 0
    count: int = 1024                   # pairs in the set
    per_shard: int = 64                 # pairs per shard = the unit of resumable work
    batch: int = 1                      # clips the teacher samples together
    dtype: str = "bf16"                 # storage dtype of the latents
    device: torch.device | str = "cpu"

    def levels(self) -> list[float]:
        return kept_levels(self.plan, self.indices)


def kept_levels(plan: Teacher | CausalPlan, indices: list[int]) -> list[float]:
    """The timesteps of the solver states kept at `indices` (the clean output, last: 0)."""
    states = plan.timesteps + [0.0]
    return [states[k] for k in indices]


def write_pairs(out: Path, job: PairJob, settings: dict, rank: int = 0, world: int = 1,
                barrier: Callable[[], None] = lambda: None, source: str = "") -> Path:
    """Generate (or finish) the pair set in `out`; every rank its pieces; returns the folder.
    `settings`: the set's record (what must match to continue it); `source`: the teacher's
    description stored with every pair."""
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
    barrier()
    if rank == 0 and not record.is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(record, json.dumps(settings, indent=2) + "\n")
    barrier()
    n, size = job.count, job.per_shard
    pieces = range(rank, -(-n // size), world)
    todo = [j for j in pieces if not piece_done(out / f"{PIECE_PREFIX}{j:06d}", min(size, n - j * size))]
    made, t0 = 0, time.perf_counter()
    for j in todo:
        first = j * size
        count = min(size, n - first)
        write_ode_pairs(out / f"{PIECE_PREFIX}{j:06d}", teacher_pairs(job, first, count, source),
                        shard_size=count, dtype=job.dtype, first_index=first)
        made += count
    if made and rank == 0:
        seconds = time.perf_counter() - t0
        print(f"ode pairs: {made} on rank 0 in {seconds:.1f} s ({seconds / made:.3f} s per pair) -> {out}",
              flush=True)
    barrier()
    return out


@torch.no_grad()
def teacher_pairs(job: PairJob, first: int, count: int, source: str = ""):
    """Samples for data/ode_pairs.write_ode_pairs: pairs first .. first + count - 1."""
    C, F, h, w = job.shape
    wanted = set(job.indices)
    steps = torch.tensor(job.levels(), dtype=torch.float32)
    for b0 in range(first, first + count, job.batch):
        ids = list(range(b0, min(b0 + job.batch, first + count)))
        captions = [job.caption(i) for i in ids]
        emb, lengths = job.text_encoder.encode(captions)
        kept: dict[int, torch.Tensor] = {}

        def keep(k, x, start=0):
            """A solver state: the whole clip (the teacher plan) or one unit from frame `start`."""
            if k in wanted:
                clip = kept.setdefault(k, torch.empty(len(ids), C, F, h, w))
                clip[:, :, start:start + x.shape[2]] = x.detach().float().cpu()

        noise = Noise([stream_seed(job.seed, PAIR_NOISE, i) for i in ids], C, h, w, device=job.device)
        neg = job.negative.expand(len(ids), -1, -1)
        rollout(job.teacher, job.plan, emb.to(job.device), noise, F, negative=neg, trajectory=keep)
        latents = torch.stack([kept[k] for k in job.indices], dim=1)       # [B, S, C, F, H, W]
        for b, i in enumerate(ids):
            yield {"ode_latents": latents[b], "ode_timesteps": steps, "text_emb": emb[b].cpu(),
                   "text_len": int(lengths[b]), "caption": captions[b],
                   "meta": {"source": f"ode_pair:{i}", "teacher": source}}


def piece_done(folder: Path, count: int) -> bool:
    """Whether a piece folder's manifest lists all its `count` pairs."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        return int(manifest["counts"]["written"]) == count
    except (OSError, ValueError, KeyError, TypeError):
        return False
