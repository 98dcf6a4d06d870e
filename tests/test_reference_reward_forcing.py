"""Reward Forcing's Re-DMD against a plain reference step (tests/plain_recipes/reward_forcing.py):
the generator's and the critic's losses and gradients equal the reference's on the same modules
and draws, with a reward that follows the pixels (a stub: the gradient tests need rewards that
differ, not a good reward) - for a full-attention and a window + sink student, rollouts longer
than the DMD window; and the toy reward is ToyBench's own score of the decoded frames."""

import numpy as np
import pytest
import torch

from forcelab.data.toyworld import ToyWorld
from forcelab.data.video import to_uint8_frames
from forcelab.distill.reward import RewardOptions, decoded_videos, load_reward
from forcelab.errors import ConfigError
from forcelab.eval.toybench import score_video
from forcelab.models.autoencoder import load_autoencoder
from forcelab.train.config import load_train_config
from forcelab.train.trainer import Trainer
from plain_recipes import reward_forcing as ref
from plain_recipes import self_forcing as sf
from plain_recipes.compare import assert_same, loss_and_grads, step_context

STUB = "plain_recipes.reward_forcing:load_stub"
TEMPERATURE = 0.02        # the stub's rewards lie a few 1e-2 apart: weights well away from 1


@pytest.fixture(scope="module")
def teacher_dir(tiny_teacher):
    return tiny_teacher(layers=1)


def make_trainer(tmp_path, teacher_dir, *extra):
    return Trainer(reward_config(tmp_path, teacher_dir, *extra))


def reward_config(tmp_path, teacher_dir, *extra):
    return load_train_config([], [
        "recipe=reward_forcing", f"roles.teacher.init={teacher_dir}", "data.batch_size=3", "data.frames=8",
        "algo.frames=4", "algo.min_chunks=2", "algo.max_chunks=3", f"algo.reward.callable={STUB}",
        f"algo.reward.temperature={TEMPERATURE}", "logging.wandb=disabled", "logging.progress=false",
        f"output_dir={tmp_path / 'run'}", *extra])


def check_steps(trainer, s, wanted):
    gen, critic = trainer.module("generator"), trainer.module("critic")
    steps = {}
    for step in range(60):
        chunks, exit_step = sf.draw_rollout(step_context(trainer, [0], step, "generator"), s)
        steps.setdefault((chunks * s.chunk, exit_step), step)
    assert wanted <= steps.keys(), steps.keys()
    for step in (steps[w] for w in sorted(wanted)):
        batch, positions = trainer.next_batch()
        for role, reference in (("generator", lambda b, c: ref.generator_loss(trainer, b, c, s, ref.stub_reward,
                                                                             TEMPERATURE)),
                                ("critic", lambda b, c: ref.critic_loss(trainer, b, c, s))):
            ctx = step_context(trainer, positions, step, role)
            got = loss_and_grads(lambda: trainer.recipe.loss(role, batch, ctx)[0], [gen, critic])
            want = loss_and_grads(lambda: reference(batch, ctx), [gen, critic])
            assert want[1].norm() > 0, (role, step)
            assert_same(got, want, what=(role, step))
        weights = ref.weights_of(ref.rewards_of(trainer, sf.generated_window(trainer, batch, ctx, s, True)[0],
                                                batch["caption"], ref.stub_reward), TEMPERATURE)
        assert max(weights) / min(weights) > 1.5, weights       # the weights matter in this step


def test_re_dmd_gradients_full_attention_and_window_sink(tmp_path, teacher_dir):
    s = sf.Settings(chunk=2, frames=4, min_chunks=2, max_chunks=3)
    check_steps(make_trainer(tmp_path / "full", teacher_dir), s, {(6, 1), (4, 3)})
    s = sf.Settings(chunk=2, frames=4, min_chunks=2, max_chunks=3, window=4, sink=2)
    check_steps(make_trainer(tmp_path / "sink", teacher_dir, "model_overrides.window_frames=4",
                             "model_overrides.sink_frames=2"), s, {(6, 2)})


def test_reward_weights_are_logged_and_one_sample_is_refused(tmp_path, teacher_dir):
    trainer = make_trainer(tmp_path / "a", teacher_dir)
    batch, positions = trainer.next_batch()
    _, logs = trainer.recipe.loss("generator", batch, step_context(trainer, positions, 0, "generator"))
    assert {"reward_mean", "reward_weight_max"} <= logs.keys() and float(logs["reward_weight_max"]) > 1
    with pytest.raises(ConfigError, match="data.batch_size"):
        make_trainer(tmp_path / "b", teacher_dir, "data.batch_size=1")


def test_toy_reward_is_toybench_on_the_decoded_frames_and_ground_truth_beats_corruptions():
    """The toy configs' reward of toy clips' latents is ToyBench's adherence and physics of the
    codec's decoded frames, scored here by ToyBench directly; a true clip's pixels score 1, and
    higher than the same clip with its frames out of order (physics) or a caption naming
    another ball (adherence)."""
    world, codec = ToyWorld(), load_autoencoder("toy")
    reward = load_reward(RewardOptions())            # the default: forcelab.eval.rewards:adherence_and_physics
    clips = [world.clip(i) for i in (1, 3)]           # clip 1: the codec round trip costs it physics
    latents = torch.cat([codec.encode(c.video.float().div(127.5).sub(1).permute(1, 0, 2, 3)[None]) for c in clips])
    captions = [c.scene.caption for c in clips]
    with torch.no_grad():
        got = reward(decoded_videos(codec, latents), captions)
    for i in range(len(clips)):
        frames = to_uint8_frames(codec.decode(latents[i:i + 1])[0].transpose(0, 1))
        scores = score_video(frames, captions[i])
        assert float(got[i]) == pytest.approx((scores["adherence"] + scores["physics"]) / 2, abs=1e-12)
    assert float(got[0]) < 0.9 < float(got[1])        # the rewards differ where ToyBench's scores do
    truth = clips[1].video.float().div(255)[None]     # [1, F, 3, H, W] in [0, 1]
    assert float(reward(truth, captions[1:])[0]) == 1.0
    shuffled = truth[:, torch.from_numpy(np.random.default_rng(0).permutation(truth.shape[1]))]
    other = "a " + next(c for c in ("red", "green", "blue", "yellow") if c not in captions[1]) + " ball"
    assert float(reward(shuffled, captions[1:])[0]) < 0.8
    assert float(reward(truth, [other])[0]) < 0.8


@pytest.mark.parametrize("override, key", [
    ("algo.reward.callable=no_such_package.rewards:load", "algo.reward.callable"),
    ("algo.reward.callable=forcelab.eval.rewards:no_such_loader", "algo.reward.callable"),
    ("algo.reward.callable=forcelab.eval.rewards", "algo.reward.callable"),
    ("algo.reward.path=/no/such/reward/model", "algo.reward.path"),
    ("algo.loss=sid", "algo.loss")])
def test_a_reward_that_cannot_load_is_one_line_naming_its_key_when_the_config_loads(override, key, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_train_config([], ["recipe=reward_forcing", "algo.frames=8", f"output_dir={tmp_path / 'run'}", override])
    assert str(e.value).startswith(key) and "\n" not in str(e.value)


@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_resume_is_bit_exact(tmp_path, teacher_dir, resume_is_exact, checkpointing):
    resume_is_exact(lambda folder, *a: reward_config(folder, teacher_dir, *a), tmp_path,
                    ("generator", "critic", "generator_ema"),
                    "roles.generator.update_every=2", "roles.generator.ema_decay=0.9", "roles.generator.ema_start=0",
                    f"roles.generator.gradient_checkpointing={checkpointing}",
                    f"roles.critic.gradient_checkpointing={checkpointing}")
