"""CausVid against a plain reference step (tests/plain_recipes/causvid.py): per-chunk levels from
[1000, 757, 522, 0], one block-causal forward over the noised real clip, clean chunks passed
through and masked, DMD / SiD with CausVid's guidance and score shift, the critic's
flow-matching loss; the generator's and the critic's losses and gradients equal the
reference's on the same modules and draws."""

import pytest

from forcelab.train.config import load_train_config
from forcelab.train.trainer import Trainer
from plain_recipes import causvid as ref
from plain_recipes.compare import assert_same, loss_and_grads, step_context


@pytest.fixture(scope="module")
def teacher_dir(tiny_teacher):
    return tiny_teacher(layers=1)


def make_trainer(tmp_path, teacher_dir, *extra):
    return Trainer(load_train_config([], [
        "recipe=causvid", f"roles.teacher.init={teacher_dir}", "data.batch_size=3", "data.frames=8",
        "algo.frames=8", "logging.wandb=disabled", "logging.progress=false", f"output_dir={tmp_path / 'run'}",
        *extra]))


def check_steps(trainer, s, steps, loss_rtol=None):
    gen, critic = trainer.module("generator"), trainer.module("critic")
    seen = set()
    for step in steps:
        batch, positions = trainer.next_batch()
        for role, reference in (("generator", ref.generator_loss), ("critic", ref.critic_loss)):
            ctx = step_context(trainer, positions, step, role)
            seen |= set(ref.chunk_levels(ctx, len(positions), s).unique().tolist())
            got = loss_and_grads(lambda: trainer.recipe.loss(role, batch, ctx)[0], [gen, critic])
            want = loss_and_grads(lambda: reference(trainer, batch, ctx, s), [gen, critic])
            assert want[1].norm() > 0, (role, step)
            assert_same(got, want, what=(role, step), loss_rtol=loss_rtol)
    assert seen == set(s.levels)          # every level, clean chunks included, was exercised


def test_dmd(tmp_path, teacher_dir):
    check_steps(make_trainer(tmp_path, teacher_dir), ref.Settings(chunk=2, frames=8), range(2))


def test_sid_and_a_given_level_list(tmp_path, teacher_dir):
    trainer = make_trainer(tmp_path, teacher_dir, "algo.loss=sid", "algo.sid_alpha=0.5",
                           "algo.levels=[900,400,0]")
    # SiD's loss value carries float32 rounding of the score passes at ~1e-5 (see the Self-Forcing test)
    check_steps(trainer, ref.Settings(chunk=2, frames=8, levels=[900.0, 400.0, 0.0], loss="sid",
                                       sid_alpha=0.5), range(2),
                loss_rtol=1e-4)
