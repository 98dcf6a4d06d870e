"""Recipe rules that no gradient comparison pins, each checked against an expectation written
out here: the roles' update ratio and order, the EMA (decay, start step, initial value, after
the generator's updates only), gradient clipping, the real score's guidance against a non-empty
negative prompt (the toy text encoder maps the default "" to zeros), the distributions of the
shared draws (rolling_prob, LongLive's switch frame), and which passes of a
rollout longer than the DMD window build a graph (memory), and the LoRA scale (alpha = rank).

Each test kills a mutation of tests/mutations.py that every other test let through."""

import math

import pytest
import torch

from forcelab.train.config import load_train_config
from forcelab.train.recipe import StepContext
from forcelab.train.trainer import Trainer

CPU = torch.device("cpu")
COMMON = ["logging.wandb=disabled", "logging.progress=false", "roles.generator.lr=1e-3", "roles.critic.lr=1e-3"]


@pytest.fixture(scope="module")
def teacher_dir(tiny_teacher):
    return tiny_teacher(layers=1)


def config(tmp_path, teacher_dir, recipe, *extra):
    return load_train_config([], [f"recipe={recipe}", f"roles.teacher.init={teacher_dir}", "data.batch_size=1",
                                  "data.height=16", "data.width=16", f"output_dir={tmp_path / 'run'}", *COMMON,
                                  *extra])


def contexts(n):
    """The step contexts of steps 0 .. n - 1 (what the trainer hands a recipe; the shared draws
    depend on the step)."""
    return [StepContext(step, 0, 0, [step], CPU) for step in range(n)]


# ---------------------------------------------------------------------- the trainer's rules
def test_update_ratio_order_ema_and_clip(tmp_path, teacher_dir):
    """Generator every 2nd step and before the critic; EMA (decay 0.75) from step 3, initialised
    to the weights then and updated after generator updates only; the critic's gradient clipped
    to norm 1e-3 before its optimizer step."""
    decay, start, clip = 0.75, 3, 1e-3
    trainer = Trainer(config(tmp_path, teacher_dir, "causvid", "data.frames=4", "algo.frames=4", "max_steps=6",
                             "checkpoint.every=0", "roles.generator.update_every=2",
                             f"roles.generator.ema_decay={decay}", f"roles.generator.ema_start={start}",
                             f"roles.critic.grad_clip={clip}"))
    updates, weights, clipped, measured = [], {}, [], []
    update, train_step, apply = trainer._update, trainer.train_step, trainer.parallel.step

    def recording_update(role):
        updates.append((trainer.step, role.name))
        out = update(role)
        if role.name == "critic":
            measured.append(out["critic/grad_norm"])
        return out

    def recording_step():
        out = train_step()
        # the trainer counts the step after train_step; the EMA sees the weights of step + 1
        weights[trainer.step + 1] = {k: p.detach().clone() for k, p in trainer.module("generator").named_parameters()}
        return out

    def recording_apply(role):
        if role.name == "critic":
            grads = [p.grad for p in role.params if p.grad is not None]
            clipped.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return apply(role)

    trainer._update, trainer.train_step, trainer.parallel.step = recording_update, recording_step, recording_apply
    trainer.run()

    assert updates == [(0, "generator"), (0, "critic"), (1, "critic"), (2, "generator"), (2, "critic"),
                       (3, "critic"), (4, "generator"), (4, "critic"), (5, "critic")]
    # generator updates end steps 1, 3, 5; the EMA starts at step 3 with the weights then and
    # takes step 5's: ema = decay * w3 + (1 - decay) * w5 (steps 4 and 6 changed nothing)
    assert not torch.equal(weights[3]["head.head.weight"], weights[5]["head.head.weight"])
    ema = trainer.roles["generator"].ema
    assert ema is not None and ema.keys() == weights[3].keys()
    for k, e in ema.items():
        expected = decay * weights[3][k].double() + (1 - decay) * weights[5][k].double()
        assert torch.allclose(e.double(), expected, rtol=0, atol=1e-6), k
    assert len(clipped) == 6 and sum(m > 2 * clip for m in measured) >= 3   # the clip was active ...
    assert all(c <= clip * (1 + 1e-4) for c in clipped)                  # ... and applied before the step


# ---------------------------------------------------------------------- the scores
def test_real_score_is_cfg_against_the_negative_prompt_and_the_fake_score_is_plain(tmp_path, teacher_dir):
    """real x0 = x_t - sigma (v_u + g (v_c - v_u)) with v_u from the NEGATIVE prompt (a non-empty
    one: the toy encoder maps "" to zeros); fake x0 = x_t - sigma v_critic, no guidance."""
    g = 3.0
    trainer = Trainer(config(tmp_path, teacher_dir, "causvid", "data.frames=4", "algo.frames=4",
                             "negative_prompt=blurry static frames", f"algo.guidance={g}"))
    negative = trainer.negative
    assert negative.abs().sum() > 0
    context = trainer.text_encoder.encode(["a red ball rolls left"])[0]
    real, fake = trainer.recipe._scores(context)
    teacher, critic = trainer.module("teacher"), trainer.module("critic")
    torch.manual_seed(0)
    x_t = torch.randn(1, teacher.config.in_channels, 4, *trainer.recipe.latent_hw)
    sigma = torch.tensor([0.6])
    t = torch.tensor([600.0])
    with torch.no_grad():
        v_c, v_u = teacher(x_t, t, context), teacher(x_t, t, negative)
        expected_real = x_t - 0.6 * (v_u + g * (v_c - v_u))
        expected_fake = x_t - 0.6 * critic(x_t, t, context)
        assert torch.allclose(real(x_t, sigma), expected_real, atol=1e-5, rtol=1e-5)
        assert torch.allclose(fake(x_t, sigma), expected_fake, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- the shared draws
def test_rolling_rollouts_come_with_the_configured_probability(tmp_path, teacher_dir):
    """rolling_prob 0.2: about a fifth of the rollouts are rolling (binomial, 400 draws: within
    5 standard deviations of 0.2), and the plan follows the draw."""
    from forcelab.models.plans import Rolling

    trainer = Trainer(config(tmp_path, teacher_dir, "rolling_forcing", "data.frames=8", "algo.frames=4",
                             "algo.steps=[1000,500]", "algo.rolling_prob=0.2"))
    recipe = trainer.recipe
    kinds = [recipe.draw_rolling(c) for c in contexts(400)]
    sd = math.sqrt(0.2 * 0.8 / 400)
    assert abs(sum(kinds) / 400 - 0.2) < 5 * sd
    plans = [isinstance(recipe.rollout_plan(c), Rolling) for c in contexts(40)]
    assert plans == kinds[:40]


def test_the_switch_frame_is_uniform_over_the_candidates(tmp_path, teacher_dir):
    """Sequences of 4 + 4 x 2 = 12 frames: steps start at 0, 4, 6, 8, 10; a switch at 4, 6 or 8,
    each with probability 1/3 (90 sequences: 30 each expected)."""
    trainer = Trainer(config(tmp_path, teacher_dir, "streaming_long", "algo.frames=4", "algo.new_frames=2",
                             "algo.max_frames=13", "algo.sink_frames=2", "algo.window_frames=4"))
    recipe = trainer.recipe
    assert recipe.switch_candidates == [4, 6, 8]
    seen = []
    for ctx in contexts(90):
        recipe.start_sequence(ctx)
        seen.append(recipe.seq.switch_at)
    counts = [seen.count(f) for f in (4, 6, 8)]
    assert sum(counts) == 90 and all(15 <= n <= 45 for n in counts), counts


# ---------------------------------------------------------------------- which passes build a graph
def test_only_chunks_in_the_dmd_window_build_a_graph(tmp_path, teacher_dir):
    """A rollout of 4 chunks judged on its last 2 (the teacher's horizon): only those 2 chunks'
    exit passes run with gradients (memory stays that of the window, whatever the length)."""
    trainer = Trainer(config(tmp_path, teacher_dir, "self_forcing", "algo.frames=4", "algo.min_chunks=4",
                             "algo.max_chunks=4"))
    grad_passes = []
    hook = trainer.module("generator").register_forward_hook(
        lambda m, a, k, out: grad_passes.append(torch.is_grad_enabled()) or None, with_kwargs=True)
    batch, positions = trainer.next_batch()
    out = trainer.recipe.generate(batch, StepContext(0, 0, 0, positions, CPU), grad=True)
    hook.remove()
    assert out.x0.shape[2] == 4 and out.x0.requires_grad
    assert sum(grad_passes) == 2 and len(grad_passes) > 4


# ---------------------------------------------------------------------- LoRA
def test_lora_scale_is_one_when_alpha_is_not_given(tmp_path, teacher_dir):
    """LongLive's adapters: rank = alpha, so a layer computes W x + b + B A x (scale alpha / rank = 1)."""
    pytest.importorskip("peft")
    trainer = Trainer(config(tmp_path, teacher_dir, "streaming_long", "algo.frames=4", "algo.new_frames=2",
                             "algo.max_frames=8", "algo.lora_rank=4"))
    layer = trainer.module("generator").get_submodule("blocks.0.ffn.2")
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.manual_seed(0)
    with torch.no_grad():
        B.copy_(torch.randn_like(B))
        x = torch.randn(3, A.shape[1])
        expected = x @ layer.base_layer.weight.T + layer.base_layer.bias + x @ A.T @ B.T
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
