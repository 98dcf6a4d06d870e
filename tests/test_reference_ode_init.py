"""ODE init against its plain reference (tests/plain_recipes/ode_init.py): the pair set the
recipe wrote holds the teacher's Euler CFG trajectory at the stored steps (noise from the
pair's seed) with their timesteps, and the recipe's regression loss and generator gradients
equal the reference's for draws that mix noisy and clean chunks."""

import pytest
import torch

from forcelab.data.ode_pairs import ODEPairs
from forcelab.models.rollout import Noise
from forcelab.train.config import load_train_config
from forcelab.seeds import stream_seed
from forcelab.train.recipe import StepContext
from forcelab.train.trainer import Trainer
from plain_recipes.compare import assert_same, loss_and_grads
from plain_recipes.ode_init import STATE_STREAM, euler_sigmas, ode_regression_loss, ode_trajectory

SEED, STEPS, SHIFT, GUIDANCE, STORED, C = 0, 4, 8.0, 3.0, [0, 2, -1], 2
PAIR_NOISE = "ode_pair_noise"   # the random stream of a pair's starting noise (per pair index)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, tiny_teacher):
    out = tmp_path_factory.mktemp("ode_ref")
    return Trainer(load_train_config([], [
        "recipe=ode_init", f"roles.teacher.init={tiny_teacher(layers=1)}", "model_overrides.dim=32",
        "model_overrides.ffn_dim=64", "model_overrides.num_layers=1", "model_overrides.num_heads=2",
        "data.frames=4", "data.batch_size=2", "algo.num_pairs=3", "algo.pairs_per_shard=2",
        f"algo.teacher_steps={STEPS}", f"algo.teacher_shift={SHIFT}", f"algo.teacher_guidance={GUIDANCE}",
        f"algo.stored_steps=[{','.join(map(str, STORED))}]", "algo.pairs_dtype=fp32", f"seed={SEED}",
        "logging.wandb=disabled", "logging.progress=false", f"output_dir={out / 'run'}"]))


def test_pairs_are_the_teachers_euler_trajectory_at_the_stored_steps(trainer):
    pairs = ODEPairs(trainer.run_dir / "ode_pairs")
    teacher, sigmas = trainer.module("teacher"), euler_sigmas(STEPS, SHIFT, 1.0)
    seen = set()
    for j in range(len(pairs)):
        pair = pairs[j]
        i = int(pair["meta"]["source"].split(":")[1])
        seen.add(i)
        lat = pair["ode_latents"]                                 # [S, C, F, H, W]
        noise = Noise([stream_seed(SEED, PAIR_NOISE, i)], *lat.shape[1:2], *lat.shape[3:])(0, lat.shape[2])
        states = ode_trajectory(teacher, noise, pair["text_emb"][None], trainer.negative, GUIDANCE, sigmas)
        want = torch.stack([states[k][0] for k in STORED])
        torch.testing.assert_close(lat, want, rtol=1e-5, atol=1e-5)
        assert pair["ode_timesteps"].tolist() == pytest.approx([1000 * sigmas[k] for k in STORED], rel=1e-6)
    assert seen == {0, 1, 2}


def test_regression_step_equals_the_plain_reference(trainer):
    gen = trainer.module("generator")
    picks = []
    for step in range(6):       # the state draws depend on the sample positions: a new batch each
        batch, positions = trainer.next_batch()
        S, F = batch["ode_latents"].shape[1], batch["ode_latents"].shape[3]
        ctx = StepContext(step, 0, SEED, positions, torch.device("cpu"), role="generator")
        picks += [torch.randint(0, S, (F // C,), generator=ctx.stream(STATE_STREAM).generator(i)).tolist()
                  for i in range(len(positions))]
        got = loss_and_grads(lambda: trainer.recipe.loss("generator", batch, ctx)[0], [gen])
        ref = loss_and_grads(lambda: ode_regression_loss(gen, batch["ode_latents"], batch["ode_timesteps"],
                                                         batch["text_emb"], ctx, C), [gen])
        assert ref[1].norm() > 0
        assert_same(got, ref, rtol=1e-5, what=step)
    flat = [s for p in picks for s in p]
    assert set(flat) == set(range(S))                # clean (masked) and every noisy state were drawn
