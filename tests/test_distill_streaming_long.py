"""Streaming long tuning (LongLive) on the trainer: the sequence persists across steps and resets
at the maximum length, the teacher judges the newest window, a prompt switch recaches with the
new prompt and keeps the sink (or wipes it on request), only new frames carry gradient and
loss, resume is bit-exact mid-sequence, and LoRA adapters train, resume and export merged."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from forcelab.distill.dmd import dmd_loss
from forcelab.models.dit import CausalDiT
from forcelab.models.kv_cache import EMPTY
from forcelab.models.rollout import Training, commit_frames, rollout
from forcelab.train.config import load_train_config
from forcelab.train.recipe import StepContext
from forcelab.train.trainer import Trainer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher_dir(tiny_teacher):
    return tiny_teacher(layers=2)


def sl_config(tmp_path, teacher_dir, *extra):
    """Sequences of 4 + 2 + 2 = 8 frames (steps start at 0, 4, 6), chunks of 2, sink 2."""
    return load_train_config([], [
        "recipe=streaming_long", f"roles.teacher.init={teacher_dir}", "data.batch_size=2",
        "algo.frames=4", "algo.new_frames=2", "algo.max_frames=9", "algo.sink_frames=2", "algo.window_frames=4",
        "logging.wandb=disabled", "logging.progress=false", "roles.generator.update_every=2",
        "roles.generator.lr=1e-3", "roles.critic.lr=1e-3", f"output_dir={tmp_path / 'run'}", *extra])


def advance(trainer, step, role="critic"):
    """One loss call of the recipe (what the trainer does per micro-batch), weights unchanged."""
    batch, positions = trainer.next_batch()
    ctx = StepContext(step, 0, trainer.cfg.seed, positions, CPU, role=role)
    loss, _ = trainer.recipe.loss(role, batch, ctx)
    return ctx, loss


def encode(trainer, positions):
    captions = [trainer.recipe.prompt_source.source.world.scene(p).caption for p in positions]
    return trainer.text_encoder.encode(captions)[0]


def test_sequence_persists_across_steps_and_resets_at_the_maximum_length(tmp_path, teacher_dir):
    trainer = Trainer(sl_config(tmp_path, teacher_dir, "algo.switch=false"))
    recipe = trainer.recipe
    assert recipe.length == 8
    ctx0, _ = advance(trainer, 0)
    seq = recipe.seq
    cache, first = seq.cache, seq.recent.clone()
    assert seq.end == 4 and cache.end_frame == 4 and torch.equal(seq.prompt, encode(trainer, ctx0.positions))
    ctx1, _ = advance(trainer, 1)
    assert recipe.seq is seq and seq.cache is cache and seq.end == 6 and cache.end_frame == 6
    assert cache.stored_frames == [0, 1, 4, 5]                  # sink + the ring's newest chunk
    # reference: frames 4, 5 generated on a FRESH cache that holds step 1's frames as committed context
    model = trainer.module("generator")
    ref_cache = model.new_cache(2, *recipe.latent_hw, chunk_frames=2, window_frames=4, sink_frames=2)
    exit_step = ctx1.stream("exit_step").shared_int(len(recipe.timesteps))
    with torch.no_grad():
        ref = rollout(model, recipe.plan(), seq.prompt, recipe.noise(ctx1), 2, cache=ref_cache, start_frame=4,
                      prefix=first, training=Training(exit_step, grad_from_frame=6)).x0
    torch.testing.assert_close(seq.recent[:, :, -2:], ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():    # without the earlier frames the continuation differs: the context matters
        alone = rollout(model, recipe.plan(), seq.prompt, recipe.noise(ctx1), 2, start_frame=4,
                        training=Training(exit_step, grad_from_frame=6)).x0
    assert not torch.allclose(alone, ref, atol=1e-3)
    advance(trainer, 2)
    assert seq.end == 8 and recipe.sequences == 1
    ctx3, _ = advance(trainer, 3)                                # at the maximum length: a new sequence
    assert recipe.seq is not seq and recipe.sequences == 2 and recipe.seq.end == 4
    assert recipe.seq.cache.stored_frames == [0, 1, 2, 3]
    assert torch.equal(recipe.seq.prompt, encode(trainer, ctx3.positions))
    assert not torch.equal(recipe.seq.prompt, seq.prompt)


def test_the_teacher_judges_the_newest_window_and_only_new_frames_count(tmp_path, teacher_dir):
    trainer = Trainer(sl_config(tmp_path, teacher_dir, "algo.switch=false", "algo.max_frames=12",
                                "algo.reencode_first=false"))
    recipe = trainer.recipe
    advance(trainer, 0)
    advance(trainer, 1)
    recent = recipe.seq.recent.clone()                           # frames [2, 6)
    seen, outs, generate = [], [], recipe.generate
    recipe.generate = lambda *a, **k: outs.append(generate(*a, **k)) or outs[-1]
    hook = trainer.module("teacher").register_forward_hook(lambda m, a, k, o: seen.append(a[0].shape[2]),
                                                           with_kwargs=True)
    advance(trainer, 2, role="generator")                        # new frames 6, 7
    hook.remove()
    out = outs[0]
    assert seen == [4]                                           # the teacher sees the 4-frame window
    assert out.x0.shape[2] == 4 and torch.equal(out.x0[:, :, :2], recent[:, :, -2:])   # overlap = frames 4, 5
    assert torch.equal(out.x0[:, :, 2:].detach(), recipe.seq.recent[:, :, -2:])       # + the new 6, 7
    assert out.mask.tolist() == [[False, False, True, True]] * 2
    # gradient flows into the generator through the new frames only
    params = list(trainer.module("generator").parameters())
    g_old = torch.autograd.grad(out.x0[:, :, :2].sum(), params, allow_unused=True, retain_graph=True)
    g_new = torch.autograd.grad(out.x0[:, :, 2:].sum(), params, allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in g_old)
    assert any(g is not None and g.abs().sum() > 0 for g in g_new)
    # the DMD gradient reaches only the new frames
    x0 = out.x0.detach().requires_grad_(True)
    real, fake = (lambda x, s: x * 0.5), (lambda x, s: x * 0.25)
    loss, _ = dmd_loss(x0, real, fake, timestep=torch.full((2,), 500.0), noise=torch.randn_like(x0), mask=out.mask)
    g = torch.autograd.grad(loss, x0)[0]
    assert g[:, :, :2].abs().sum() == 0 and (g[:, :, 2:].abs().sum(dim=(1, 3, 4)) > 0).all()
    # the critic's window carries the same mask
    advance(trainer, 3)
    assert outs[-1].mask.tolist() == [[False, False, True, True]] * 2 and outs[-1].x0.shape[2] == 4


@pytest.mark.parametrize("keep_sink", [True, False])
def test_a_switch_recaches_with_the_new_prompt_and_keeps_the_sink(tmp_path, teacher_dir, keep_sink):
    # window 8: the ring holds every frame of the sequence, so the recached frames stay visible
    trainer = Trainer(sl_config(tmp_path, teacher_dir, "algo.window_frames=8", f"algo.keep_sink={keep_sink}"))
    recipe = trainer.recipe
    model = trainer.module("generator")
    assert recipe.switch_candidates == [4]
    advance(trainer, 0)
    seq = recipe.seq
    assert seq.switch_at == 4
    before, old_prompt = seq.cache.state_dict(), seq.prompt.clone()
    S = seq.cache.tokens_per_frame
    seen = []
    hook = trainer.module("teacher").register_forward_hook(lambda m, a, k, o: seen.append(a[2]), with_kwargs=True)
    ctx1, _ = advance(trainer, 1, role="generator")               # the switch step: new frames 4, 5
    hook.remove()
    new_prompt = encode(trainer, ctx1.positions)
    assert torch.equal(seq.prompt, new_prompt) and not torch.equal(new_prompt, old_prompt)
    assert all(torch.equal(c[:2], new_prompt) for c in seen)       # the teacher judges with the new prompt
    ref_kv = model.context_kv(new_prompt)
    assert torch.equal(seq.cache.context_kv[0][0], ref_kv[0][0])  # cross-attention on the new prompt
    k_after = seq.cache.k[0]
    if keep_sink:
        assert seq.cache.stored_frames == [0, 1, 2, 3, 4, 5]
        assert torch.equal(k_after[:, :2 * S], before["k"][0][:, :2 * S])       # the sink is kept as it was
    else:
        assert seq.cache.stored_frames == [2, 3, 4, 5]                # wiped, never rewritten
        assert seq.cache.slot_frame[:2] == [EMPTY, EMPTY]
    # frames 2, 3 were re-run with the new prompt: their keys match a hand recache ...
    ref = model.new_cache(2, *recipe.latent_hw, chunk_frames=2, window_frames=8, sink_frames=2)
    ref.load_state_dict(before)
    ref.reset(keep_sink=keep_sink)
    model.set_prompt(ref, new_prompt)
    frames_23 = seq.recent[:, :, 0:2]                               # recent = frames [2, 6)
    commit_frames(model, ref, frames_23, 0.0, 2)
    slot = lambda cache, f: cache.slot_frame.index(f)              # noqa: E731
    last = len(seq.cache.k) - 1      # (the first layer's keys come before any cross-attention)
    for f in (2, 3):
        for layer in range(last + 1):
            got = seq.cache.k[layer][:, slot(seq.cache, f) * S:(slot(seq.cache, f) + 1) * S]
            want = ref.k[layer][:, slot(ref, f) * S:(slot(ref, f) + 1) * S]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        old = before["k"][last][:, f * S:(f + 1) * S]
        assert not torch.allclose(got, old, atol=1e-4)            # ... and differ from the old prompt's


def metrics(path):
    rows = [json.loads(x) for x in (path / "run" / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "steps_per_s")} for r in rows]


def weights(path, step, role):
    return load_file(str(path / "run" / f"checkpoint-{step:06d}" / role / "diffusion_pytorch_model.safetensors"))


def check_resume(tmp_path, teacher_dir, *extra):
    args = ("max_steps=6", "checkpoint.every=3", "logging.every=1", *extra)
    Trainer(sl_config(tmp_path / "a", teacher_dir, *args)).run()
    b = sl_config(tmp_path / "b", teacher_dir, *args)
    Trainer(b).run(stop_at=3)
    resumed = Trainer(b, resume="latest")
    state = torch.load(tmp_path / "b" / "run" / "checkpoint-000003" / "rng-rank0.pt", weights_only=True)["recipe"]
    resumed.run()
    assert metrics(tmp_path / "a") and metrics(tmp_path / "a") == metrics(tmp_path / "b")
    for role in ("generator", "critic"):
        wa, wb = weights(tmp_path / "a", 6, role), weights(tmp_path / "b", 6, role)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), role
    return state


@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_resume_mid_sequence_is_bit_exact(tmp_path, teacher_dir, checkpointing):
    state = check_resume(tmp_path, teacher_dir, f"roles.generator.gradient_checkpointing={checkpointing}",
                         f"roles.critic.gradient_checkpointing={checkpointing}")
    # steps 0 and 2 update generator and critic, step 1 the critic: 5 advances of 3-step sequences
    assert state["sequence"]["end"] == 6 and state["sequences"] == 2


# ---------------------------------------------------------------------- LoRA
def test_lora_trains_only_adapters_resumes_and_exports_merged(tmp_path, teacher_dir):
    pytest.importorskip("peft")
    from forcelab.distill.lora import lora_layers
    from forcelab.train.export import export

    lora = ("algo.lora_rank=4", "algo.lora_alpha=8")
    check_resume(tmp_path, teacher_dir, *lora)
    run = tmp_path / "a" / "run"
    # the adapters are written once (rank 0's state); another rank reads them from there
    resumed = Trainer(sl_config(tmp_path / "b", teacher_dir, "max_steps=6", *lora), resume="latest")
    module = resumed.module("generator")
    want = {n: p.detach().clone() for n, p in module.named_parameters()}
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    resumed.recipe.run = dataclasses.replace(resumed.recipe.run, rank=1)     # what rank 1's recipe sees
    resumed.recipe.load_state_dict({"sequences": 0})
    assert all(torch.equal(p, want[n]) for n, p in module.named_parameters())
    # a fresh trainer on the same base: the adapters it trains are its only trainable parameters
    trainer = Trainer(sl_config(tmp_path / "c", teacher_dir, "max_steps=2", *lora))
    gen = trainer.roles["generator"]
    names = {n for n, p in gen.module.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n for n in names) and len(gen.params) == len(names)
    assert len(lora_layers(gen.module)) == 2 * 10                       # per block: q k v o of both attentions + 2 FFN linears
    base = {n: p.detach().clone() for n, p in gen.module.named_parameters() if ".lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in gen.module.named_parameters() if ".lora_B" in n}
    trainer.run()
    after = dict(gen.module.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base.items())                # the base is frozen
    assert any(not torch.equal(after[n], v) for n, v in adapters.items())        # the adapters trained
    # export merges: W + alpha / rank * B A, by hand in float64
    out = export(run, tmp_path / "exported")
    merged = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    from forcelab.models.checkpoint import wan_to_diffusers
    ckpt = torch.load(run / "checkpoint-000006" / "rng-rank0.pt", weights_only=True)["recipe"]["lora"]["generator"]
    teacher = CausalDiT.from_pretrained(teacher_dir)
    for name in ("blocks.0.self_attn.q", "blocks.0.cross_attn.v", "blocks.0.ffn.2"):
        A, B = ckpt[f"{name}.lora_A.default.weight"].double(), ckpt[f"{name}.lora_B.default.weight"].double()
        want = teacher.get_submodule(name).weight.double() + 8 / 4 * B @ A
        got = merged[wan_to_diffusers(f"{name}.weight")].double()
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        assert B.abs().sum() > 0
    # a new stage from the LoRA run starts from the merged weights with fresh (zero) adapters
    stage = Trainer(sl_config(tmp_path / "e", teacher_dir, f"roles.generator.init={run}",
                              "roles.generator.init_role=generator", *lora))
    assert stage.step == 0 and stage.roles["generator"].updates == 0
    g = dict(stage.roles["generator"].module.named_parameters())
    assert all(g[n].abs().sum() == 0 for n in g if ".lora_B" in n)
    torch.testing.assert_close(g["blocks.0.self_attn.q.base_layer.weight"],
                               merged[wan_to_diffusers("blocks.0.self_attn.q.weight")], atol=0, rtol=0)


def test_lora_without_peft_is_a_clear_error(tmp_path, teacher_dir, monkeypatch):
    import builtins

    from forcelab.errors import ConfigError
    real_import = builtins.__import__

    def no_peft(name, *a, **k):
        if name == "peft" or name.startswith("peft."):
            raise ImportError(name)
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_peft)
    with pytest.raises(ConfigError, match="peft"):
        Trainer(sl_config(tmp_path, teacher_dir, "algo.lora_rank=4"))


def test_bad_options_are_named(tmp_path, teacher_dir):
    from forcelab.errors import ConfigError
    for extra, key in [("algo.new_frames=3", "new_frames"), ("algo.new_frames=6", "new_frames"),
                       ("algo.switch_frames=[5]", "switch_frames"), ("algo.max_frames=2", "max_frames")]:
        with pytest.raises(ConfigError, match=key):
            Trainer(sl_config(tmp_path / key, teacher_dir, extra))


def test_without_stream_checkpoints_a_resume_starts_a_new_sequence(tmp_path, teacher_dir):
    trainer = Trainer(sl_config(tmp_path, teacher_dir, "algo.checkpoint_stream=false"))
    advance(trainer, 0)
    state = trainer.recipe.state_dict()
    assert "sequence" not in state and state["sequences"] == 1
    trainer.recipe.seq = None
    trainer.recipe.load_state_dict(state)
    assert trainer.recipe.seq is None              # the next loss call starts a sequence
