"""ODE init: the teacher trajectory hook against hand-run solvers, the pair set on disk
(round trip, resume of the generation, settings guard), the masked regression loss, training
and bit-exact resume."""

import json

import pytest
import torch

from forcelab.data.ode_pairs import ODEPairs
from forcelab.errors import ConfigError, ForcelabError
from forcelab.models import CausalDiT
from forcelab.models.autoencoder import load_autoencoder
from forcelab.models.plans import Chunkwise, Teacher
from forcelab.models.rollout import Noise, rollout
from forcelab.models.schedule import make_solver, teacher_sigmas
from forcelab.models.text_encoder import load_text_encoder
from forcelab.train.config import load_train_config
from forcelab.seeds import stream_seed
from forcelab.train.recipe import StepContext
from forcelab.train.timesteps import choose_levels
from forcelab.train.trainer import Trainer

CODEC = load_autoencoder("toy")                 # the toy run's codec: latent channels and grid from it
C, GRID = CODEC.latent_channels, 32 // CODEC.spatial_stride     # data.height = data.width = 32
TINY = ["model_overrides.dim=32", "model_overrides.ffn_dim=64", "model_overrides.num_layers=1",
        "model_overrides.num_heads=2", "data.frames=4", "data.batch_size=2", "logging.wandb=disabled",
        "logging.progress=false", "logging.every=100", "recipe=ode_init", "roles.generator.lr=1e-3",
        "algo.num_pairs=4", "algo.pairs_per_shard=2", "algo.teacher_steps=4", "algo.teacher_guidance=3.0",
        "algo.stored_steps=[0,2,-1]", "algo.pairs_dtype=fp32"]


@pytest.fixture(scope="module")
def teacher_dir(tiny_teacher):
    return tiny_teacher(layers=1)


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return CausalDiT.from_pretrained(teacher_dir).requires_grad_(False)


def config(teacher_dir, out, *extra):
    return load_train_config([], TINY + [f"roles.teacher.init={teacher_dir}", f"output_dir={out}", *extra])


def cfg_v(model, x, sigma, cond, uncond, guidance):
    """The guided flow by hand: two separate forwards, uncond + g (cond - uncond)."""
    t = torch.full((x.shape[0], x.shape[2]), float(sigma) * 1000)
    v_c, v_u = model(x, t, cond), model(x, t, uncond)
    return v_u + guidance * (v_c - v_u)


# ---------------------------------------------------------------------- the trajectory hook
@pytest.mark.parametrize("solver", ["euler", "unipc"])
def test_recorded_trajectory_is_the_solver_run(teacher, solver):
    if solver == "unipc":
        pytest.importorskip("diffusers")
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(1, 5, 32, generator=g), torch.randn(1, 3, 32, generator=g)
    plan = Teacher(steps=5, shift=3.0, solver=solver, guidance=2.5, sigma_max=1.0)
    noise = Noise([11], C, 4, 4)
    states = {}
    out = rollout(teacher, plan, cond, noise, 3, negative=uncond,
                  trajectory=lambda k, x: states.__setitem__(k, x.clone())).x0
    assert sorted(states) == list(range(6))
    plain = rollout(teacher, plan, cond, noise, 3, negative=uncond).x0
    assert torch.equal(states[5], out) and torch.equal(out, plain)     # the hook changes nothing
    # by hand: Euler arithmetic, or the solver object stepped in order
    sigmas = teacher_sigmas(5, 3.0, 1.0)
    ref = make_solver("unipc", 5, 3.0, 1.0) if solver == "unipc" else None
    x = noise(0, 3)
    for k in range(6):
        assert (states[k] - x).abs().max() < 1e-4, k
        if k < 5:
            v = cfg_v(teacher, x, sigmas[k], cond, uncond, 2.5)
            x = ref.step(k, x, v) if ref else x + (float(sigmas[k + 1]) - float(sigmas[k])) * v
    assert float(sigmas[0]) == 1.0


def test_trajectory_is_for_the_teacher_plan(teacher):
    with pytest.raises(ForcelabError, match="teacher plan"):
        rollout(teacher, Chunkwise(), torch.zeros(1, 2, 32), Noise([0], C, 4, 4), 2, trajectory=print)


def test_public_levels():
    """Self-Forcing's stored indices of 48 steps, shift 8, from t = 1000 (algorithms.md)."""
    ts = Teacher(steps=48, shift=8.0, sigma_max=1.0).timesteps + [0.0]
    assert [round(ts[k], 1) for k in (0, 12, 24, 36, -1)] == [1000.0, 960.0, 888.9, 727.3, 0.0]


# ---------------------------------------------------------------------- the pair set
@pytest.fixture(scope="module")
def pairs_run(teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "run"
    trainer = Trainer(config(teacher_dir, out, "max_steps=1"))
    return trainer, out / "ode_pairs"


def test_pairs_round_trip(pairs_run, teacher):
    trainer, folder = pairs_run
    pairs = ODEPairs(folder)
    assert len(pairs) == 4 and pairs.keys == [f"{i:09d}" for i in range(4)]
    record = json.loads((folder / "ode-pairs.json").read_text())
    assert record["stored_steps"] == [0, 2, 4] and record["num_pairs"] == 4
    te = load_text_encoder("toy")
    from forcelab.data.toyworld import ToyWorld
    world = ToyWorld(seed=0)
    plan = Teacher(steps=4, shift=8.0, solver="euler", guidance=3.0, sigma_max=1.0)
    neg = te.encode([""])[0]
    for i in range(4):
        p = pairs[i]
        caption = world.scene(i).caption
        emb, lengths = te.encode([caption])
        assert p["caption"] == caption and p["text_len"] == int(lengths[0])
        assert torch.equal(p["text_emb"], emb[0])
        states = {}
        rollout(teacher, plan, emb, Noise([stream_seed(0, "ode_pair_noise", i)], C, GRID, GRID), 4, negative=neg,
                trajectory=lambda k, x: states.__setitem__(k, x.clone()))
        assert p["ode_latents"].shape == (3, C, 4, GRID, GRID)
        assert torch.equal(p["ode_latents"], torch.stack([states[k][0] for k in (0, 2, 4)]))
        ts = plan.timesteps
        assert p["ode_timesteps"].tolist() == pytest.approx([ts[0], ts[2], 0.0])


def test_pair_generation_resumes_and_guards_its_settings(pairs_run, teacher_dir, tmp_path):
    trainer, folder = pairs_run
    piece = folder / "piece-000001"
    shard = next(folder.glob("piece-000000/*.tar"))
    redo = next(piece.glob("*.tar"))
    before = (shard.stat().st_mtime_ns, (piece / "manifest.json").read_text(), redo.read_bytes())
    (piece / "manifest.json").unlink()          # a run killed before piece 1 was complete
    redo.unlink()
    trainer.recipe.make_pairs()
    assert shard.stat().st_mtime_ns == before[0]                 # piece 0 was not redone
    assert (piece / "manifest.json").read_text() == before[1]    # piece 1 was, identically
    assert redo.read_bytes() == before[2]
    assert len(ODEPairs(folder)) == 4
    with pytest.raises(ConfigError, match="other settings.*plan"):
        Trainer(config(teacher_dir, tmp_path / "r", "max_steps=1", f"algo.pairs_dir={folder}",
                       "algo.teacher_steps=6", "algo.stored_steps=[0,3,-1]"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(ConfigError, match="no ODE pairs written by forcelab"):
        Trainer(config(teacher_dir, tmp_path / "r2", "max_steps=1", f"algo.pairs_dir={tmp_path / 'mine'}"))
    # a finished pair set as the data source: nothing is generated
    reuse = Trainer(config(teacher_dir, tmp_path / "r3", "max_steps=1", f"data.source={folder}"))
    assert not (tmp_path / "r3" / "ode_pairs").exists() and len(reuse.stream.maps.dataset) == 4


def test_prompts_from_a_prompt_file(teacher_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\na green ball moving slowly\n")
    trainer = Trainer(config(teacher_dir, tmp_path / "run", "max_steps=1", f"data.source={prompts}",
                             "algo.num_pairs=3", "algo.pairs_per_shard=3"))
    pairs = trainer.stream.maps.dataset
    assert [pairs[i]["caption"] for i in range(3)] == ["a red ball", "a green ball moving slowly", "a red ball"]


@pytest.mark.parametrize("steps,message", [("[0,2]", "clean output"), ("[2,0,-1]", "increase"),
                                          ("[0,9,-1]", "not a solver state")])
def test_bad_stored_steps(teacher_dir, tmp_path, steps, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(config(teacher_dir, tmp_path / "run", f"algo.stored_steps={steps}"))


def test_the_teacher_needs_weights(tmp_path):
    with pytest.raises(ConfigError, match="frozen teacher needs weights"):
        Trainer(load_train_config([], TINY + [f"output_dir={tmp_path / 'run'}"]))


# ---------------------------------------------------------------------- the loss
def test_loss_is_masked_at_the_clean_level(pairs_run):
    trainer, _ = pairs_run
    recipe = trainer.recipe
    batch = recipe.stream.batch([0, 1])
    levels = batch["ode_timesteps"][0]
    for first in range(0, 200, 2):       # a draw with both clean and noisy chunks
        ctx = StepContext(0, 0, 0, [first, first + 1], torch.device("cpu"))
        idx = ctx.stream("stored_state").per_sample(lambda b, generator: choose_levels([0, 1, 2], b, 4, 2, generator)).long()
        if (idx == 2).any() and (idx < 2).any():
            break
    ctx = StepContext(0, 0, 0, [first, first + 1], torch.device("cpu"))
    module = trainer.module("generator")
    seen = {}

    def keep_v(mod, args, out):
        out.retain_grad()
        seen["v"], seen["x"], seen["t"] = out, args[0], args[1]

    handle = module.register_forward_hook(keep_v)
    try:
        loss, _ = recipe.loss("generator", batch, ctx)
    finally:
        handle.remove()
    loss.backward()
    t = seen["t"]
    assert torch.equal(t, levels[idx])                       # each chunk at its own stored level
    clean = (t == 0)[:, None, :, None, None].expand_as(seen["v"])
    grad = seen["v"].grad
    assert grad[clean].abs().max() == 0 and grad[~clean].abs().max() > 0
    # the loss by hand (float64): mean over the noisy frames of (x_t - sigma v - x0)^2
    x, v = seen["x"].double(), seen["v"].detach().double()
    x0 = x - (t.double() / 1000)[:, None, :, None, None] * v
    err = (x0 - batch["ode_latents"][:, -1].double()) ** 2
    assert float(loss.detach()) == pytest.approx(float(err[~clean].mean()), rel=1e-5)
    module.zero_grad(set_to_none=True)


def test_training_lowers_the_regression_loss(teacher_dir, tmp_path):
    trainer = Trainer(config(teacher_dir, tmp_path / "run", "max_steps=40", "checkpoint.every=0",
                             "roles.generator.lr=3e-3", "logging.sample_every=40"))
    batch = trainer.recipe.stream.batch([0, 1, 2, 3])
    ctxs = [StepContext(0, 0, 5, [p, p + 1, p + 2, p + 3], torch.device("cpu")) for p in range(0, 40, 4)]

    def fixed_loss():
        with torch.no_grad():
            return sum(float(trainer.recipe.loss("generator", batch, c)[0]) for c in ctxs) / len(ctxs)

    before = fixed_loss()
    trainer.run()
    after = fixed_loss()
    print(f"ode_init fixed-batch loss: {before:.5f} -> {after:.5f}")
    assert after < 0.5 * before
    # periodic samples: the chunk-wise plan at the stored levels above 0
    assert trainer.recipe.sample_list == pytest.approx(trainer.recipe.levels[:-1])
    assert len(list((tmp_path / "run" / "samples" / "step-000040").glob("*.mp4"))) == 2


def test_resume_is_bit_exact(teacher_dir, tmp_path):
    from safetensors.torch import load_file

    pairs = tmp_path / "pairs"
    common = ["max_steps=6", "checkpoint.every=3", f"algo.pairs_dir={pairs}", "roles.generator.ema_decay=0.9",
              "roles.generator.ema_start=2"]
    Trainer(config(teacher_dir, tmp_path / "a", *common)).run()
    split = config(teacher_dir, tmp_path / "b", *common)
    Trainer(split).run(stop_at=3)
    Trainer(split, resume="latest").run()

    def rows(run):
        return [json.loads(line)["generator/loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    def weights(run, step, role="generator"):
        return load_file(str(run / f"checkpoint-{step:06d}" / role / "diffusion_pytorch_model.safetensors"))

    a, b = tmp_path / "a", tmp_path / "b"
    assert rows(a) == rows(b) and len(rows(a)) == 6
    for role in ("generator", "generator_ema"):
        wa, wb = weights(a, 6, role), weights(b, 6, role)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    w3 = weights(a, 3)
    assert any(not torch.equal(w3[k], weights(a, 6)[k]) for k in w3)


def test_two_processes_write_the_same_pair_set(teacher_dir, pairs_run, tmp_path):
    """Ranks split the pieces (0 and 2 on rank 0, 1 and 3 on rank 1); the set equals the
    one-process set pair for pair, and training starts after the barrier."""
    import os
    import subprocess
    import sys

    _, one = pairs_run
    out = tmp_path / "run"
    args = TINY + [f"roles.teacher.init={teacher_dir}", f"output_dir={out}", "max_steps=1",
                   "algo.pairs_per_shard=1", "data.batch_size=1"]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "forcelab.distill", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "ode_pairs").glob("piece-*")) == [f"piece-00000{j}" for j in range(4)]
    two, ref = ODEPairs(out / "ode_pairs"), ODEPairs(one)
    assert two.keys == ref.keys
    for i in range(4):
        assert torch.equal(two[i]["ode_latents"], ref[i]["ode_latents"])
    assert (out / "checkpoint-000001").is_dir()


def test_the_pair_stage_runs_without_a_trainer_and_its_set_does_not_depend_on_the_ranks(pairs_run, teacher,
                                                                                       tmp_path):
    """The data stage alone (no trainer, no recipe): two ranks' shares, written one after the
    other, give exactly the pairs the recipe's one-process run wrote."""
    from forcelab.data.toyworld import ToyWorld
    from forcelab.distill.ode_pair_stage import PairJob, write_pairs

    trainer, folder = pairs_run
    te, world = load_text_encoder("toy"), ToyWorld(seed=0)
    job = PairJob(teacher, Teacher(steps=4, shift=8.0, solver="euler", guidance=3.0, sigma_max=1.0), [0, 2, 4],
                  [C, 4, GRID, GRID], lambda i: world.scene(i).caption, te, te.encode([""])[0], seed=0, count=4,
                  per_shard=2, dtype="fp32")
    settings = {"made": "by hand"}
    for rank in (0, 1):          # rank 0 writes the settings record (the barrier orders that in a real run)
        write_pairs(tmp_path / "pairs", job, settings, rank=rank, world=2)
    mine, theirs = ODEPairs(tmp_path / "pairs"), ODEPairs(folder)
    assert len(mine) == len(theirs) == 4
    for i in range(4):
        assert torch.equal(mine[i]["ode_latents"], theirs[i]["ode_latents"])
        assert mine[i]["caption"] == theirs[i]["caption"]
    with pytest.raises(ConfigError, match="other settings"):
        write_pairs(tmp_path / "pairs", job, {"made": "otherwise"})
