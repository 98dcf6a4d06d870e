"""Causal Forcing's initialisations against their plain reference (tests/plain_recipes/
causal_forcing.py): the causal ODE pairs the ode_init recipe writes with teacher_kind causal
are the AR teacher's chunk-by-chunk Euler trajectory (each chunk seeing the clean earlier
chunks; no KV cache in the reference) at the stored steps, and the causal CD recipe's loss and
generator gradients equal the reference's, with CFG and with the EMA as the target."""

import pytest
import torch

from forcelab.data.ode_pairs import ODEPairs
from forcelab.models.rollout import Noise
from forcelab.seeds import stream_seed
from forcelab.train.config import load_train_config
from forcelab.train.recipe import StepContext
from forcelab.train.trainer import Trainer
from plain_recipes.compare import assert_same, loss_and_grads
from plain_recipes.causal_forcing import causal_cd_loss, causal_ode_trajectory
from plain_recipes.ode_init import euler_sigmas

SEED, STEPS, SHIFT, STORED, C = 0, 4, 8.0, [0, 2, -1], 2
PAIR_NOISE = "ode_pair_noise"   # the random stream of a pair's starting noise (per pair index)
TINY = ["model_overrides.dim=32", "model_overrides.ffn_dim=64", "model_overrides.num_layers=1",
        "model_overrides.num_heads=2", "logging.wandb=disabled", "logging.progress=false", f"seed={SEED}"]
CD_STEPS, CD_SHIFT, GUIDANCE = 6, 5.0, 2.0


@pytest.fixture(scope="module")
def pairs_trainer(tmp_path_factory, tiny_teacher):
    out = tmp_path_factory.mktemp("causal_ode_ref")
    return Trainer(load_train_config([], [
        "recipe=ode_init", f"roles.teacher.init={tiny_teacher(layers=1)}", *TINY, "data.frames=4",
        "data.batch_size=2", "algo.num_pairs=3", "algo.pairs_per_shard=2", "algo.teacher_kind=causal",
        f"algo.teacher_steps={STEPS}", f"algo.teacher_shift={SHIFT}", "algo.teacher_guidance=1.0",
        f"algo.stored_steps=[{','.join(map(str, STORED))}]", "algo.pairs_dtype=fp32", f"output_dir={out / 'run'}"]))


def test_causal_pairs_are_the_ar_teachers_chunkwise_euler_trajectory(pairs_trainer):
    pairs = ODEPairs(pairs_trainer.run_dir / "ode_pairs")
    teacher, sigmas = pairs_trainer.module("teacher"), euler_sigmas(STEPS, SHIFT, 1.0)
    seen = set()
    for j in range(len(pairs)):
        pair = pairs[j]
        i = int(pair["meta"]["source"].split(":")[1])
        seen.add(i)
        lat = pair["ode_latents"]                                 # [S, C, F, H, W]
        noise = Noise([stream_seed(SEED, PAIR_NOISE, i)], *lat.shape[1:2], *lat.shape[3:])(0, lat.shape[2])
        states = causal_ode_trajectory(teacher, noise, pair["text_emb"][None], sigmas, C)
        want = torch.stack([states[k][0] for k in STORED])
        torch.testing.assert_close(lat, want, rtol=1e-5, atol=1e-5)
        assert pair["ode_timesteps"].tolist() == pytest.approx([1000 * sigmas[k] for k in STORED], rel=1e-6)
        # not the bidirectional solve: the first chunk's output differs once later chunks exist
        assert (lat[-1, :, C:] - lat[-1, :, :C]).abs().max() > 0
    assert seen == {0, 1, 2}


@pytest.fixture(scope="module")
def cd_trainer(tmp_path_factory, tiny_teacher):
    out = tmp_path_factory.mktemp("causal_cd_ref")
    return Trainer(load_train_config([], [
        "recipe=causal_cd", f"roles.teacher.init={tiny_teacher(layers=1)}", *TINY, "data.frames=4",
        "data.batch_size=2", f"algo.cd_steps={CD_STEPS}", f"algo.cd_shift={CD_SHIFT}",
        f"algo.guidance={GUIDANCE}", f"output_dir={out / 'run'}"]))


def _perturbed(module, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: p.detach().float() + scale * torch.randn(p.shape, generator=g) for k, p in module.named_parameters()}


def test_causal_cd_step_equals_the_plain_reference(cd_trainer):
    """Without EMA the target is the live student (stop-gradient); then with an EMA (a perturbed
    copy) the target is the EMA's x0 and the gradient still reaches only the student."""
    import copy

    t = cd_trainer
    gen, teacher = t.module("generator"), t.module("teacher")
    role = t.roles["generator"]
    levels_seen = set()
    for step in range(4):
        batch, positions = t.next_batch()
        ctx = StepContext(step, 0, SEED, positions, torch.device("cpu"), role="generator")
        levels_seen |= {int(torch.randint(0, CD_STEPS - 1, (1,), generator=ctx.stream("cd_step").generator(i)))
                        for i in range(len(positions))}
        ema = _perturbed(gen, seed=step) if step % 2 else None
        role.ema = ema
        target = gen
        if ema is not None:
            target = copy.deepcopy(gen)
            with torch.no_grad():
                for k, p in target.named_parameters():
                    p.copy_(ema[k])
        got = loss_and_grads(lambda: t.recipe.loss("generator", batch, ctx)[0], [gen])
        ref = loss_and_grads(lambda: causal_cd_loss(gen, target, teacher, batch["latent"], batch["text_emb"],
                                                    t.negative, ctx, CD_STEPS, CD_SHIFT, GUIDANCE, C, C), [gen])
        assert ref[1].norm() > 0 and ref[0] > 0
        assert_same(got, ref, rtol=1e-4, what=step)
    role.ema = None
    assert len(levels_seen) >= 3


@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_causal_cd_resume_is_bit_exact(tmp_path, tiny_teacher, resume_is_exact, checkpointing):
    def make_config(folder, *overrides):
        return load_train_config([], [
            "recipe=causal_cd", f"roles.teacher.init={tiny_teacher(layers=1)}", *TINY, "data.frames=4",
            "data.batch_size=2", f"algo.cd_steps={CD_STEPS}", f"algo.guidance={GUIDANCE}",
            f"roles.generator.gradient_checkpointing={checkpointing}", f"output_dir={folder / 'run'}", *overrides])
    resume_is_exact(make_config, tmp_path, ("generator", "generator_ema"), "roles.generator.ema_decay=0.9",
                    "roles.generator.ema_start=0")
