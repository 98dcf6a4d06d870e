"""Self-Forcing++ against its plain reference (tests/plain_recipes/self_forcing_pp.py): windows
at the video's start and later (re-encoded first frame), entering at pure noise and at lower
levels (backward noise from the long rollout), with a rolling attention window and context
noise: the recipe's generator (DMD) and critic gradients and losses equal the reference's,
on the same modules and the same raw draws. The reference rolls out all L frames."""

import pytest
import torch

from forcelab.models.rollout import Noise
from forcelab.train.config import load_train_config
from forcelab.train.recipe import StepContext
from forcelab.train.trainer import Trainer
from plain_recipes.compare import assert_same, loss_and_grads
from plain_recipes.rolling_forcing import Scores
from plain_recipes.self_forcing_pp import BACKWARD_NOISE, ROLLOUT_NOISE, PPOptions, draw_window, self_forcing_pp_loss

C, T, L, CONTEXT_NOISE, SEED = 2, 4, 12, 40.0, 0
STEPS = [1000.0, 750.0, 500.0]
OPTIONS = PPOptions(steps=STEPS, warp_shift=5.0, frames=T, rollout_frames=L, chunk=C, window=T, sink=0,
                    context_noise=CONTEXT_NOISE)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, tiny_teacher):
    out = tmp_path_factory.mktemp("pp_ref")
    return Trainer(load_train_config([], [
        "recipe=self_forcing_pp", f"roles.teacher.init={tiny_teacher(layers=1)}", "data.batch_size=2",
        f"algo.steps=[{','.join(map(str, STEPS))}]", f"algo.frames={T}", f"algo.rollout_frames={L}",
        f"algo.context_noise={CONTEXT_NOISE}", f"seed={SEED}", "logging.wandb=disabled", "logging.progress=false",
        f"output_dir={out / 'run'}"]))


def cases():
    """Steps whose shared draws give: the video's start; a later window entering at pure
    noise; a later window entering at the last level."""
    wanted = [lambda s, e: s == 0, lambda s, e: s > 0 and e == 0, lambda s, e: s > 0 and e == len(STEPS) - 1]
    found = []
    for want in wanted:
        found.append(next(step for step in range(200)
                          if want(*draw_window(StepContext(step, 0, SEED, [0], torch.device("cpu")), OPTIONS))))
    return found


@pytest.mark.parametrize("role", ["generator", "critic"])
def test_self_forcing_pp_step_equals_the_plain_reference(trainer, role):
    batch, positions = trainer.next_batch()
    gen, critic = trainer.module("generator"), trainer.module("critic")
    grid = 32 // trainer.codec.spatial_stride
    scores = Scores(trainer.module("teacher"), critic, trainer.negative, guidance=4.0)
    for step in cases():
        ctx = StepContext(step, 0, SEED, positions, torch.device("cpu"), role=role)
        noise, fresh = (Noise(ctx.stream(d).seeds(), gen.config.in_channels, grid, grid)
                        for d in (ROLLOUT_NOISE, BACKWARD_NOISE))
        got = loss_and_grads(lambda: trainer.recipe.loss(role, batch, ctx)[0], [gen, critic])
        ref = loss_and_grads(lambda: self_forcing_pp_loss(role, gen, batch["text_emb"], ctx, noise, fresh,
                                                          trainer.codec, scores, OPTIONS), [gen, critic])
        assert ref[1].norm() > 0
        assert_same(got, ref, rtol=1e-5, what=(role, step))
