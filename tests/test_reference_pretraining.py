"""Diffusion forcing, teacher forcing and AR-Diffusion against plain reference steps
(tests/plain_recipes/pretraining.py): per-chunk independent levels under causal attention,
[clean | noisy] teacher forcing, non-decreasing FoPP / forward-walk levels; the loss and the
generator's gradient equal the reference's on the same one-layer model and draws."""

import pytest

from forcelab.train.config import load_train_config
from forcelab.train.trainer import Trainer
from plain_recipes import pretraining as ref
from plain_recipes.compare import assert_same, loss_and_grads, step_context

TINY = ["model_overrides.dim=32", "model_overrides.ffn_dim=64", "model_overrides.num_layers=1",
        "model_overrides.num_heads=2", "model_overrides.chunk_frames=2", "data.frames=6", "data.batch_size=2",
        "logging.wandb=disabled", "logging.progress=false"]


def check(tmp_path, overrides, reference, steps=(0, 1)):
    trainer = Trainer(load_train_config([], TINY + [f"output_dir={tmp_path}/run", *overrides]))
    gen = trainer.module("generator")
    for step in steps:
        batch, positions = trainer.next_batch()
        ctx = step_context(trainer, positions, step, "generator")
        got = loss_and_grads(lambda: trainer.recipe.loss("generator", batch, ctx)[0], [gen])
        want = loss_and_grads(lambda: reference(trainer, batch, ctx), [gen])
        assert want[1].norm() > 0
        assert_same(got, want, what=step)


@pytest.mark.parametrize("teacher_forcing", [False, True])
def test_diffusion_forcing(tmp_path, teacher_forcing):
    check(tmp_path, ["recipe=diffusion_forcing", f"algo.teacher_forcing={teacher_forcing}", "algo.shift=3"],
          lambda tr, b, c: ref.diffusion_forcing_loss(tr, b, c, chunk=2, teacher_forcing=teacher_forcing, shift=3.0))


@pytest.mark.parametrize("teacher_forcing", [False, True])
def test_diffusion_forcing_attention_window(tmp_path, teacher_forcing):
    check(tmp_path, ["recipe=diffusion_forcing", f"algo.teacher_forcing={teacher_forcing}", "algo.window_frames=4"],
          lambda tr, b, c: ref.diffusion_forcing_loss(tr, b, c, chunk=2, teacher_forcing=teacher_forcing, window=4))


def test_diffusion_forcing_logit_normal_and_caption_dropout(tmp_path):
    check(tmp_path, ["recipe=diffusion_forcing", "algo.sigma_dist=logit_normal", "algo.uncond_prob=0.5"],
          lambda tr, b, c: ref.diffusion_forcing_loss(tr, b, c, chunk=2, distribution="logit_normal",
                                                      uncond_prob=0.5), steps=range(3))


@pytest.mark.parametrize("sampler", ["fopp", "forward"])
def test_ar_diffusion(tmp_path, sampler):
    check(tmp_path, ["recipe=ar_diffusion", "algo.num_levels=50", f"algo.sampler={sampler}", "algo.shift=2"],
          lambda tr, b, c: ref.ar_diffusion_loss(tr, b, c, num_levels=50, sampler=sampler, shift=2.0))


def test_ar_diffusion_chunks(tmp_path):
    check(tmp_path, ["recipe=ar_diffusion", "algo.num_levels=1000", "algo.chunk_frames=2"],
          lambda tr, b, c: ref.ar_diffusion_loss(tr, b, c, num_levels=1000, unit=2))


def test_counts_are_the_enumerated_ones():
    """The reference's integer counts against brute-force enumeration (small T, F)."""
    import itertools
    T, F = 4, 3
    seqs = [s for s in itertools.product(range(T), repeat=F) if all(a <= b for a, b in zip(s, s[1:]))]
    suffix, prefix = ref.completion_counts(F, T), ref.prefix_counts(F, T)
    for t in range(T):
        for f in range(F):
            assert suffix[t][f] == len({s[f:] for s in seqs if s[f] == t})
            assert prefix[t][f] == len({s[:f + 1] for s in seqs if s[f] == t})
