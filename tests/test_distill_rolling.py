"""Rolling Forcing on the trainer: gradient windows tile the frames exactly once for every exit
(against the hand-enumerated rolling schedule), every frame's output is present, only finished
chunks are committed, the plan mix and the exit are shared across ranks, resume exactness."""


import pytest
import torch

from forcelab.models.plans import Rolling
from forcelab.models.rollout import Training
from forcelab.train.config import load_train_config
from forcelab.train.recipe import StepContext
from forcelab.train.trainer import Trainer
from forcelab.errors import ConfigError

STEPS, CHUNKS, C = [1000, 750, 500], 5, 2         # S = 3 levels -> windows of up to 3 chunks


@pytest.fixture(scope="module")
def teacher_dir(tiny_teacher):
    return tiny_teacher(layers=1)


def rf_config(tmp_path, teacher_dir, *extra):
    return load_train_config([], [
        "recipe=rolling_forcing", f"roles.teacher.init={teacher_dir}", "data.batch_size=1", "data.frames=8",
        f"algo.steps=[{','.join(map(str, STEPS))}]", f"algo.frames={CHUNKS * C}", f"algo.min_chunks={CHUNKS}",
        f"algo.max_chunks={CHUNKS}", "algo.window_frames=4", "algo.sink_frames=2", "logging.wandb=disabled",
        "logging.progress=false", "roles.generator.update_every=2", "roles.generator.lr=1e-3",
        "roles.critic.lr=1e-3", f"output_dir={tmp_path / 'run'}", *extra])


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, teacher_dir):
    return Trainer(rf_config(tmp_path_factory.mktemp("rf"), teacher_dir))


def expected_grad_windows(exit_step, units=CHUNKS, steps=len(STEPS)):
    """The rolling schedule by hand: iteration i denoises units max(0, i-S+1)..min(U-1, i);
    gradient iterations are i % S == exit. -> [(first unit, last unit, iteration)]."""
    return [(max(0, i - steps + 1), min(units - 1, i), i)
            for i in range(steps + units - 1) if i % steps == exit_step]


def record_passes(model):
    calls = []

    def hook(module, args, kwargs, out):
        calls.append((torch.is_grad_enabled(), kwargs.get("start_frame"), args[0].shape[2], kwargs.get("commit")))
    return calls, model.register_forward_hook(hook, with_kwargs=True)


def test_gradient_windows_tile_the_frames_once_for_every_exit(trainer):
    recipe, model = trainer.recipe, trainer.module("generator")
    batch, positions = trainer.next_batch()
    ctx = StepContext(0, 0, 0, positions, torch.device("cpu"))
    recipe.draw_rolling = lambda ctx: True
    frames, S = CHUNKS * C, len(STEPS)
    try:
        for exit_step in range(S):
            recipe.draw_rollout = lambda ctx, e=exit_step: (frames, e)
            calls, handle = record_passes(model)
            out = recipe.generate(batch, ctx, grad=True)
            handle.remove()
            grad_windows = [(start // C, (start + n) // C - 1) for g, start, n, commit in calls if g and not commit]
            expected = expected_grad_windows(exit_step)
            assert grad_windows == [(a, b) for a, b, _ in expected], exit_step
            covered = sorted(f for a, b in grad_windows for f in range(a * C, (b + 1) * C))
            assert covered == list(range(frames)), exit_step          # each frame in exactly one window
            assert out.mask.all() and out.x0.shape[2] == frames
            assert (out.x0.abs().sum(dim=(1, 3, 4)) > 0).all()        # no frame left empty
            for f in range(frames):                                     # every frame carries gradient
                g = torch.autograd.grad(out.x0[:, :, f].sum(), [model.head.head.weight], retain_graph=True,
                                        allow_unused=True)[0]
                assert g is not None and g.abs().sum() > 0, (exit_step, f)
    finally:
        del recipe.draw_rolling, recipe.draw_rollout


def test_each_frame_x0_comes_from_its_level_in_its_gradient_window(trainer):
    recipe = trainer.recipe
    batch, positions = trainer.next_batch()
    ctx = StepContext(0, 0, 0, positions, torch.device("cpu"))
    for exit_step in range(len(STEPS)):
        res = recipe.student_rollout(batch, ctx, CHUNKS * C, plan=recipe.plan(), training=Training(exit_step))
        want = []
        for a, b, i in expected_grad_windows(exit_step):
            want += [recipe.timesteps[i - u] for u in range(a, b + 1) for _ in range(C)]
        assert res.timesteps.tolist() == pytest.approx(want), exit_step
        assert res.grad_frames.all()


def test_only_finished_chunks_are_committed_and_the_sink_is_kept(trainer):
    recipe, model = trainer.recipe, trainer.module("generator")
    batch, positions = trainer.next_batch()
    ctx = StepContext(0, 0, 0, positions, torch.device("cpu"))
    calls, handle = record_passes(model)
    res = recipe.student_rollout(batch, ctx, CHUNKS * C, plan=recipe.plan(), training=Training(1))
    handle.remove()
    commits = [(start, n) for _, start, n, commit in calls if commit]
    assert commits == [(u * C, C) for u in range(CHUNKS)]     # once per chunk, in order, after it finished
    # window 4 frames incl. the query chunk -> a 2-frame ring; sink = frames 0, 1
    assert res.cache.stored_frames == [0, 1, 8, 9]


def test_plan_mix_and_exit_are_shared_draws(trainer):
    recipe = trainer.recipe
    ctxs = [(StepContext(s, m, 0, [0], torch.device("cpu")), StepContext(s, m, 0, [7, 8], torch.device("cpu")))
            for s in range(40) for m in range(2)]
    kinds = [recipe.draw_rolling(a) for a, _ in ctxs]
    assert kinds == [recipe.draw_rolling(b) for _, b in ctxs]                 # another rank's batch: same draw
    assert [recipe.draw_rollout(a) for a, _ in ctxs] == [recipe.draw_rollout(b) for _, b in ctxs]
    assert 0.2 < sum(kinds) / len(kinds) < 0.8                               # rolling_prob 0.5
    assert {recipe.draw_rollout(a)[1] for a, _ in ctxs} == set(range(len(STEPS)))
    assert isinstance(recipe.rollout_plan(ctxs[kinds.index(True)][0]), Rolling)
    assert not isinstance(recipe.rollout_plan(ctxs[kinds.index(False)][0]), Rolling)


def test_bad_sizes_are_config_errors(tmp_path, teacher_dir):
    with pytest.raises(ConfigError, match="window_frames"):
        Trainer(rf_config(tmp_path, teacher_dir, "algo.window_frames=3"))
    with pytest.raises(ConfigError, match="rolling_prob"):
        Trainer(rf_config(tmp_path, teacher_dir, "algo.rolling_prob=1.5"))


@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_resume_is_bit_exact(tmp_path, teacher_dir, resume_is_exact, checkpointing):
    resume_is_exact(lambda folder, *a: rf_config(folder, teacher_dir, *a), tmp_path, ("generator", "critic"),
                    "algo.min_chunks=3", "algo.max_chunks=4", "algo.frames=6",
                    f"roles.generator.gradient_checkpointing={checkpointing}",
                    f"roles.critic.gradient_checkpointing={checkpointing}")


def test_the_critic_rollout_builds_no_graph(trainer):
    recipe, model = trainer.recipe, trainer.module("generator")
    batch, positions = trainer.next_batch()
    ctx = StepContext(1, 0, 0, positions, torch.device("cpu"))
    calls, handle = record_passes(model)
    with torch.no_grad():
        out = recipe.generate(batch, ctx, grad=False)
    handle.remove()
    assert not any(g for g, *_ in calls) and not out.x0.requires_grad
    assert out.mask.all() and (out.x0.abs().sum(dim=(1, 3, 4)) > 0).all()
