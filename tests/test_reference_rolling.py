"""Rolling Forcing against its plain reference (tests/plain_recipes/rolling_forcing.py): for
rolling and chunk-wise rollouts, every exit step and both chunk counts of the range, with a
window + sink and a DMD window shorter than the video (re-encoded first frame), the recipe's
generator (DMD) and critic gradients and losses equal the reference's, on the same modules
and the same raw draws (the score timestep snapped to the shifted table, as the shipped config
does). The sink uses true-distance RoPE (see the reference)."""

import pytest
import torch

from forcelab.models.rollout import Noise
from forcelab.train.config import load_train_config
from forcelab.train.recipe import StepContext
from forcelab.train.trainer import Trainer
from plain_recipes.compare import assert_same, loss_and_grads
from plain_recipes.rolling_forcing import ROLLOUT_NOISE, RollingOptions, Scores, draw_rollout, rolling_forcing_loss

STEPS, C, FRAMES, CHUNKS = [1000.0, 750.0, 500.0], 2, 6, (4, 5)   # S = 3; DMD window 6 of 8 or 10 frames
WINDOW, SINK, CONTEXT_NOISE, SNAP, SEED = 4, 2, 40.0, 5.0, 0    # SNAP: the shipped config's table snap
OPTIONS = RollingOptions(steps=STEPS, warp_shift=5.0, frames=FRAMES, min_chunks=CHUNKS[0], max_chunks=CHUNKS[1],
                         chunk=C, window=WINDOW, sink=SINK, context_noise=CONTEXT_NOISE, rolling_prob=0.5)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, tiny_teacher):
    out = tmp_path_factory.mktemp("rf_ref")
    return Trainer(load_train_config([], [
        "recipe=rolling_forcing", f"roles.teacher.init={tiny_teacher(layers=1)}", "data.batch_size=2",
        f"algo.steps=[{','.join(map(str, STEPS))}]", f"algo.frames={FRAMES}", f"algo.min_chunks={CHUNKS[0]}",
        f"algo.max_chunks={CHUNKS[1]}", f"algo.window_frames={WINDOW}", f"algo.sink_frames={SINK}",
        f"algo.context_noise={CONTEXT_NOISE}", f"algo.snap_shift={SNAP}", f"seed={SEED}", "logging.wandb=disabled",
        "logging.progress=false", f"output_dir={out / 'run'}"]))


def cases():
    """Steps whose shared draws give rolling and chunk-wise rollouts, every exit and both
    chunk counts: (rolling, exit, chunks or None for any)."""
    wanted, found = [(True, 0, 4), (True, 1, 5), (True, 2, None), (False, 1, None)], []
    for want in wanted:
        for step in range(200):
            chunks, exit_step, rolling = draw_rollout(StepContext(step, 0, SEED, [0], torch.device("cpu")), OPTIONS)
            if (rolling, exit_step) == want[:2] and want[2] in (None, chunks):
                found.append(step)
                break
    assert len(found) == len(wanted)
    return found


@pytest.mark.parametrize("role", ["generator", "critic"])
def test_rolling_forcing_step_equals_the_plain_reference(trainer, role):
    batch, positions = trainer.next_batch()
    codec, negative = trainer.codec, trainer.negative
    gen = trainer.module("generator")
    hw = (32 // codec.spatial_stride,) * 2
    scores = Scores(trainer.module("teacher"), trainer.module("critic"), negative, guidance=4.0, snap_shift=SNAP)
    modules = [gen, trainer.module("critic")]
    for step in cases():
        ctx = StepContext(step, 0, SEED, positions, torch.device("cpu"), role=role)
        noise = Noise(ctx.stream(ROLLOUT_NOISE).seeds(), gen.config.in_channels, *hw)
        got = loss_and_grads(lambda: trainer.recipe.loss(role, batch, ctx)[0], modules)
        ref = loss_and_grads(lambda: rolling_forcing_loss(role, gen, batch["text_emb"], ctx, noise, codec, scores,
                                                          OPTIONS), modules)
        assert ref[1].norm() > 0
        assert_same(got, ref, rtol=1e-5, what=(role, step))
