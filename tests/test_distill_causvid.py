"""CausVid on the trainer: per-chunk levels from the student's list (t = 0 chunks are the real
latents, passed through and masked), ONE block-causal forward whose x0 matches a hand
conversion of the model's flow, causality across chunks, resume exactness."""


import pytest
import torch

from forcelab.errors import ConfigError
from forcelab.train.config import load_train_config
from forcelab.train.recipe import StepContext
from forcelab.train.trainer import Trainer

LEVELS = [1000.0, 757.0, 522.0, 0.0]


@pytest.fixture(scope="module")
def teacher_dir(tiny_teacher):
    return tiny_teacher(layers=1)


def cv_config(tmp_path, teacher_dir, *extra):
    return load_train_config([], [
        "recipe=causvid", f"roles.teacher.init={teacher_dir}", "data.batch_size=3", "data.frames=8",
        "algo.frames=8", "logging.wandb=disabled", "logging.progress=false", "roles.generator.update_every=2",
        "roles.generator.lr=1e-3", "roles.critic.lr=1e-3", f"output_dir={tmp_path / 'run'}", *extra])


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, teacher_dir):
    return Trainer(cv_config(tmp_path_factory.mktemp("cv"), teacher_dir))


def test_default_levels_are_the_student_list_plus_clean(trainer):
    assert trainer.recipe.levels == LEVELS
    assert trainer.recipe.plan().timesteps == LEVELS[:3]


def test_per_chunk_levels_one_forward_and_clean_chunks_pass_through(trainer):
    recipe, model = trainer.recipe, trainer.module("generator")
    seen_levels = set()
    for step in range(6):
        batch, positions = trainer.next_batch()
        ctx = StepContext(step, 0, 0, positions, torch.device("cpu"))
        t = recipe.chunk_levels(ctx, 8)
        assert t.shape == (3, 8) and torch.equal(t[:, ::2], t[:, 1::2])       # constant within a chunk
        assert set(t.unique().tolist()) <= set(LEVELS)
        seen_levels |= set(t.unique().tolist())
        calls = []
        h = model.register_forward_hook(lambda m, a, k, o: calls.append((a, k, o)), with_kwargs=True)
        out = recipe.generate(batch, ctx, grad=True)
        h.remove()
        assert len(calls) == 1                                                  # ONE forward over the clip
        (x_t, t_in, _), kwargs, v = calls[0]
        assert x_t.shape[2] == 8 and kwargs["chunk_frames"] == 2 and torch.equal(t_in, t)
        sigma = (t / 1000).double()[:, None, :, None, None]
        x0 = batch["latent"].double()
        assert torch.allclose(x_t.double(), (1 - sigma) * x0 + sigma * ctx.stream("clip_noise").normal(x0.shape[1:]).double(),
                              atol=1e-5)
        want = x_t.double() - sigma * v.double()                               # v-prediction -> x0
        clean = (t == 0)[:, None, :, None, None]
        assert torch.allclose(out.x0.double(), torch.where(clean, x0, want), atol=1e-5)
        assert torch.equal(out.x0[clean.expand_as(out.x0)], batch["latent"][clean.expand_as(out.x0)])
        assert torch.equal(out.mask, t > 0)
    assert seen_levels == set(LEVELS)


def test_the_forward_is_block_causal(trainer):
    recipe = trainer.recipe
    batch, positions = trainer.next_batch()
    ctx = StepContext(0, 0, 0, positions, torch.device("cpu"))
    with torch.no_grad():
        a = recipe.generate(batch, ctx, grad=False).x0
        batch["latent"] = batch["latent"].clone()
        batch["latent"][:, :, 6:] += 1.0                                         # change the last chunk only
        b = recipe.generate(batch, ctx, grad=False).x0
    assert torch.equal(a[:, :, :6], b[:, :, :6]) and not torch.equal(a[:, :, 6:], b[:, :, 6:])


def test_the_clip_is_the_first_frames_and_a_short_clip_is_an_error(trainer):
    recipe = trainer.recipe
    batch, positions = trainer.next_batch()
    ctx = StepContext(0, 0, 0, positions, torch.device("cpu"))
    try:
        recipe.opt.frames = 6
        out = recipe.generate(batch, ctx, grad=False)
        assert out.x0.shape[2] == 6 and out.mask.shape == (3, 6)
        recipe.opt.frames = 10
        with pytest.raises(ConfigError, match="algo.frames"):
            recipe.generate(batch, ctx, grad=False)
    finally:
        recipe.opt.frames = 8


def test_resume_is_bit_exact(tmp_path, teacher_dir, resume_is_exact):
    resume_is_exact(lambda folder, *a: cv_config(folder, teacher_dir, *a), tmp_path, ("generator", "critic"), "data.batch_size=1")
