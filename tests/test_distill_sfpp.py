"""Self-Forcing++ on the trainer: gradients only in the sampled window, the window start is
chunk aligned and ranges over the configured long rollout, the window starts from the
backward-noised frames of the long rollout against its cache (checked against a plain
rollout and a direct pass), resume exactness."""


import pytest
import torch

from forcelab.models.rollout import INITIAL, denoise_window, rollout
from forcelab.models.schedule import add_noise, timestep_to_sigma
from forcelab.train.config import load_train_config
from forcelab.train.recipe import StepContext
from forcelab.train.trainer import Trainer

C, T, L = 2, 4, 16          # chunk, teacher horizon (window), long rollout: 4 x T


@pytest.fixture(scope="module")
def teacher_dir(tiny_teacher):
    return tiny_teacher(layers=1)


def pp_config(tmp_path, teacher_dir, *extra):
    return load_train_config([], [
        "recipe=self_forcing_pp", f"roles.teacher.init={teacher_dir}", "data.batch_size=1", "data.frames=8",
        "algo.steps=[1000,750,500]", f"algo.frames={T}", f"algo.rollout_frames={L}", "logging.wandb=disabled",
        "logging.progress=false", "roles.generator.update_every=2", "roles.generator.lr=1e-3",
        "roles.critic.lr=1e-3", f"output_dir={tmp_path / 'run'}", *extra])


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, teacher_dir):
    return Trainer(pp_config(tmp_path_factory.mktemp("pp"), teacher_dir))


def forced(recipe, start, entry):
    recipe.draw_window = lambda ctx: (start, entry)


def test_gradients_only_in_the_window(trainer):
    recipe, model = trainer.recipe, trainer.module("generator")
    batch, positions = trainer.next_batch()
    ctx = StepContext(0, 0, 0, positions, torch.device("cpu"))
    for start, entry in [(6, 1), (0, 2), (L - T, 0)]:
        forced(recipe, start, entry)
        calls = []
        h = model.register_forward_hook(lambda m, a, k, o: calls.append(
            (torch.is_grad_enabled(), k.get("start_frame"), a[0].shape[2], k.get("commit"))), with_kwargs=True)
        out = recipe.generate(batch, ctx, grad=True)
        h.remove()
        grad = [(s, n) for g, s, n, _ in calls if g]
        assert grad == [(start + k * C, C) for k in range(T // C)]            # one pass per window chunk
        assert max(s + n for _, s, n, _ in calls) == start + T                  # nothing generated past the window
        assert out.x0.shape[2] == T and out.x0.requires_grad
        assert out.mask[0].tolist() == ([False] * C + [True] * (T - C) if start else [True] * T)
        for f in range(T):
            g = torch.autograd.grad(out.x0[:, :, f].sum(), [model.head.head.weight], retain_graph=True)[0]
            assert g.abs().sum() > 0 or (start and f == 0)                    # (frame 0 re-encoded)
    del recipe.draw_window


def test_the_critic_rollout_builds_no_graph(trainer):
    recipe, model = trainer.recipe, trainer.module("generator")
    batch, positions = trainer.next_batch()
    forced(recipe, 6, 1)
    calls = []
    h = model.register_forward_hook(lambda m, a, k, o: calls.append(torch.is_grad_enabled()), with_kwargs=True)
    with torch.no_grad():
        out = recipe.generate(batch, StepContext(0, 0, 0, positions, torch.device("cpu")), grad=False)
    h.remove()
    del recipe.draw_window
    assert calls and not any(calls) and not out.x0.requires_grad and out.mask.all()


def test_window_start_is_chunk_aligned_over_the_long_rollout(tmp_path, trainer, teacher_dir):
    ctxs = [StepContext(s, m, 0, [0], torch.device("cpu")) for s in range(60) for m in range(2)]
    draws = [trainer.recipe.draw_window(c) for c in ctxs]
    assert {s for s, _ in draws} == set(range(0, L - T + 1, C))                # aligned, up to L - T
    assert {e for _, e in draws} == {0, 1, 2}
    other = [trainer.recipe.draw_window(StepContext(c.step, c.micro, 0, [5, 9], c.device)) for c in ctxs]
    assert other == draws                                                       # the same on every rank
    longer = Trainer(pp_config(tmp_path, teacher_dir, "algo.rollout_frames=32")).recipe
    assert {longer.draw_window(c)[0] for c in ctxs} == set(range(0, 32 - T + 1, C))
    default = Trainer(pp_config(tmp_path / "d", teacher_dir, "algo.rollout_frames=null")).recipe
    assert default.rollout_frames == 4 * T


def test_the_window_starts_from_the_backward_noised_long_rollout(trainer):
    recipe, model = trainer.recipe, trainer.module("generator")
    batch, positions = trainer.next_batch()
    ctx = StepContext(3, 0, 0, positions, torch.device("cpu"))
    start, entry = 6, 1
    forced(recipe, start, entry)
    seen = []
    h = model.register_forward_hook(lambda m, a, k, o: seen.append((a[0].detach(), o.detach()))
                                    if torch.is_grad_enabled() else None, with_kwargs=True)
    recipe.generate(batch, ctx, grad=True)
    h.remove()
    del recipe.draw_window
    context, noise, plan = batch["text_emb"], recipe.noise(ctx), recipe.plan()
    with torch.no_grad():
        # reference: ONE plain rollout of the whole prefix + window (no cache copy)
        full = rollout(model, plan, context, noise, start + T).x0
        sigma = timestep_to_sigma(recipe.timesteps[entry])
        want_in = add_noise(full[:, :, start:start + C], recipe.noise(ctx, "backward_noise")(start, C, INITIAL), sigma)
        assert torch.allclose(seen[0][0], want_in, atol=1e-6)
        # ... and the first window pass sees the cache of frames [0, start)
        ref_cache = rollout(model, plan, context, noise, start).cache
        v, _ = denoise_window(model, want_in, sigma, ref_cache, start_frame=start)
        assert torch.allclose(seen[0][1], v, atol=1e-5)


@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_resume_is_bit_exact(tmp_path, teacher_dir, resume_is_exact, checkpointing):
    resume_is_exact(lambda folder, *a: pp_config(folder, teacher_dir, *a), tmp_path, ("generator", "critic"),
                    "algo.rollout_frames=8", f"roles.generator.gradient_checkpointing={checkpointing}",
                    f"roles.critic.gradient_checkpointing={checkpointing}")
