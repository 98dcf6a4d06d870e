"""Self-Forcing (DMD and SiD) against a plain reference step (tests/plain_recipes/self_forcing.py):
the generator's and the critic's losses and gradients equal the reference's, on the same
modules and draws, for rollouts longer than the DMD window (re-encoded, masked first chunk),
a student with window + sink, several chunk counts and exit steps, context noise, snapped
score timesteps, SiD and first-frame conditioning (a committed prefix of real frames)."""

import pytest

from forcelab.train.config import load_train_config
from forcelab.train.trainer import Trainer
from plain_recipes import self_forcing as ref
from plain_recipes.compare import assert_same, loss_and_grads, step_context

WANTED = {(8, 0), (8, 3), (6, 1), (4, 2)}    # (frames, exit step) pairs the steps below cover


@pytest.fixture(scope="module")
def teacher_dir(tiny_teacher):
    return tiny_teacher(layers=1)


def make_trainer(tmp_path, teacher_dir, *extra):
    return Trainer(load_train_config([], [
        "recipe=self_forcing", f"roles.teacher.init={teacher_dir}", "data.batch_size=2", "data.frames=8",
        "algo.frames=4", "algo.min_chunks=2", "algo.max_chunks=4", "logging.wandb=disabled",
        "logging.progress=false", f"output_dir={tmp_path / 'run'}", *extra]))


def settings(**kw):
    # the recipe's laws as algorithms.md states them; only the toy sizes are the test's
    return ref.Settings(chunk=2, frames=4, min_chunks=2, max_chunks=4, **kw)


def steps_covering(trainer, s, wanted, limit=60):
    """Step indices whose drawn (frames, exit) cover `wanted` (by the reference's law)."""
    found = {}
    for step in range(limit):
        chunks, exit_step = ref.draw_rollout(step_context(trainer, [0], step, "generator"), s)
        found.setdefault((chunks * s.chunk, exit_step), step)
    assert wanted <= found.keys(), found.keys()
    return [found[w] for w in sorted(wanted)]


def check_step(trainer, s, step, loss_rtol=None, positions=None, rtol=1e-5):
    gen, critic = trainer.module("generator"), trainer.module("critic")
    batch, batch_positions = trainer.next_batch()
    positions = positions or batch_positions     # the draws follow ctx.positions, the prompts the batch
    for role, reference in (("generator", ref.generator_loss), ("critic", ref.critic_loss)):
        ctx = step_context(trainer, positions, step, role)
        got = loss_and_grads(lambda: trainer.recipe.loss(role, batch, ctx)[0], [gen, critic])
        want = loss_and_grads(lambda: reference(trainer, batch, ctx, s), [gen, critic])
        assert want[1].norm() > 0, (role, step)
        assert_same(got, want, rtol, what=(role, step), loss_rtol=loss_rtol)


def test_dmd_window_and_sink_student_longer_rollouts(tmp_path, teacher_dir):
    trainer = make_trainer(tmp_path, teacher_dir, "model_overrides.window_frames=4",
                           "model_overrides.sink_frames=2")
    s = settings(window=4, sink=2)
    for step in steps_covering(trainer, s, WANTED):
        check_step(trainer, s, step)


def test_score_timesteps_clamped_at_both_ends(tmp_path, teacher_dir):
    """Sample positions whose raw score draws k land below t_min and above t_max once shifted
    (k < 4: 1000 shift(k / 1000) < 20 with shift 5; k > 906: > 980)."""
    import torch
    trainer = make_trainer(tmp_path, teacher_dir)
    s = settings()

    def k(p, draw):
        return int(torch.randint(0, 1000, (1,), generator=step_context(trainer, [p], 0, "").stream(draw).generator(0)))
    low = next(p for p in range(20000) if k(p, ref.GENERATOR_DRAWS[0]) < 4 and k(p, ref.CRITIC_DRAWS[0]) > 906)
    high = next(p for p in range(20000) if k(p, ref.GENERATOR_DRAWS[0]) > 906 and k(p, ref.CRITIC_DRAWS[0]) < 4)
    # at t = 20 the DMD normaliser mean|x0 - real| is ~1e-3: it magnifies the float32 rounding of
    # the score passes (the recipe batches cond and uncond in one forward) to ~5e-5 of the gradient
    check_step(trainer, s, step=0, positions=[low, high], rtol=2e-4)


def test_dmd_full_attention_context_noise_snapped_score_timesteps_no_reencode(tmp_path, teacher_dir):
    # both documented variants: snapped score timesteps (the public code) and no re-encode
    trainer = make_trainer(tmp_path, teacher_dir, "algo.context_noise=40", "algo.snap_shift=5",
                           "algo.reencode_first=false")
    s = settings(context_noise=40.0, snap_shift=5.0, reencode_first=False)
    for step in steps_covering(trainer, s, {(8, 1), (6, 2)}):
        check_step(trainer, s, step)


def test_sid(tmp_path, teacher_dir):
    trainer = make_trainer(tmp_path, teacher_dir, "algo.loss=sid", "algo.sid_alpha=0.7")
    s = settings(loss="sid", sid_alpha=0.7)
    for step in steps_covering(trainer, s, {(8, 2), (4, 1)}):
        # SiD's loss is a mean of products of small score differences that partly cancel: its
        # value carries float32 rounding of the score passes at ~1e-5 (the gradients agree to 1e-7)
        check_step(trainer, s, step, loss_rtol=1e-4)


def test_first_frame_conditioning_prefix(tmp_path, teacher_dir):
    trainer = make_trainer(tmp_path, teacher_dir, "algo.prefix_frames=2", "algo.frames=6",
                           "algo.min_chunks=2", "algo.max_chunks=3")
    s = ref.Settings(chunk=2, frames=6, min_chunks=2, max_chunks=3, prefix_frames=2)
    # 2 prefix + 6 generated frames: longer than the window (re-encode); 2 + 4: the prefix is in it
    for step in steps_covering(trainer, s, {(6, 3), (4, 0)}):
        check_step(trainer, s, step)
