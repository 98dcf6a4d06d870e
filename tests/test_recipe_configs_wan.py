"""Every Wan-scale recipe config (configs/recipes/*.yaml) trains in miniature: each file runs
on CPU with only the model's sizes, the data and the weight paths changed (SHRINK below, one
list); every algorithm setting of the file is kept - gradient checkpointing, attention window,
sink and its RoPE policy, chunk counts, denoising lists and schedules, update ratios, gradient
accumulation, LoRA, EMA, bf16 autocast - so a combination that breaks a cluster run breaks here.
The windowed recipes must train the same with and without gradient checkpointing, and the
LongLive two-stage instruction in streaming_long.yaml runs as written."""

import json
import math
import shlex
from pathlib import Path

import pytest
import torch

from forcelab.models import CausalDiT, DiTConfig
from forcelab.train.cli import split_args
from forcelab.train.config import config_dict, load_train_config
from forcelab.train.recipe import StepContext
from forcelab.train.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "configs" / "recipes"
CONFIGS = sorted(p.stem for p in RECIPES.glob("*.yaml") if p.stem != "wan_base")   # wan_base: a base, not a run

# The model in miniature: Wan2.1's architecture (its preset) at test width and depth, with the
# toy codec's 6 latent channels and the toy text encoder's 32-wide, 16-token prompts.
SIZES = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=1, in_channels=6, out_channels=6, text_dim=32, text_len=16)
SHRINK = [
    *(f"model_overrides.{k}={v}" for k, v in SIZES.items()),
    "vae=toy", "text_encoder=toy",          # the toy codec and text encoder for the Wan VAE and umT5
    "data.source=toyworld",                 # toy-world clips and captions for the shards / prompt file
    "data.height=16", "data.width=16",      # 16x16 pixels -> 4x4 latents -> 2x2 tokens per frame
    "data.frames=21",                       # the toy codec keeps every frame: 21 latent frames (81 Wan frames)
    "logging.wandb=disabled", "logging.progress=false",
]
DATA_SIZES = {"ode_init": ["algo.num_pairs=2"],    # ODE pairs the teacher samples before training
              "reward_forcing": ["data.batch_size=2"]}   # Re-DMD normalises over a micro-step's samples: 2 on 1 process
STEPS = 2


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    """A random DiT folder of the miniature size: every role's weights (teacher, critic, student)."""
    path = tmp_path_factory.mktemp("wan") / "dit"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CausalDiT(DiTConfig.preset("wan2.1-t2v-1.3b", **SIZES)).save_pretrained(path)
    return path


def miniature(name: str, weights: Path, *extra: str):
    """(the file's config, its miniature): weights the file points at that do not exist here
    (Wan folders, earlier stages' runs) become the tiny DiT; `extra` overrides come last."""
    path = RECIPES / f"{name}.yaml"
    wan = load_train_config([path])
    inits = [f"roles.{r}.init={weights}" for r, rc in wan.roles.items() if rc.init and not Path(rc.init).exists()]
    return wan, load_train_config([path], [*SHRINK, *DATA_SIZES.get(wan.recipe, []), *inits, *extra])


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def trainable_params(trainer) -> dict:
    return {(n, i): p.detach().clone() for n, r in trainer.roles.items() if r.trainable for i, p in enumerate(r.params)}


@pytest.mark.parametrize("name", CONFIGS)
def test_wan_config_trains_in_miniature(name, tiny_wan, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)              # the file's own output_dir, under tmp_path
    wan, cfg = miniature(name, tiny_wan)
    gen = cfg.roles.get("generator")
    # a cluster run reaches the EMA's first step with these settings; the step counter alone decides
    # which roles update and whether the EMA starts, so the two steps start at the first generator
    # update from ema_start on (step 0 without EMA): both roles of a DMD recipe update there
    start = 0 if gen is None or gen.ema_decay is None else -(-gen.ema_start // gen.update_every) * gen.update_every
    cfg.max_steps = start + STEPS

    changed = {k for k, v in flat(config_dict(cfg)).items() if flat(config_dict(wan)).get(k, object()) != v}
    shrunk = {o.split("=")[0] for o in SHRINK + DATA_SIZES.get(wan.recipe, [])}
    assert changed <= shrunk | {f"roles.{r}.init" for r in wan.roles} | {"max_steps"}, changed - shrunk

    trainer = Trainer(cfg)
    trainer.step = start
    before = trainable_params(trainer)
    trainer.run()
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == STEPS and trainer.nonfinite == 0
    assert not any(k.endswith("/skipped") for r in rows for k in r)
    after = trainable_params(trainer)
    for role_name, role in trainer.roles.items():
        if not role.trainable:
            continue
        due = sum(s % role.cfg.update_every == 0 for s in range(start, start + STEPS))
        assert due >= 1 and role.updates == due, (role_name, role.updates, due)      # every role trains
        assert all(math.isfinite(r[f"{role_name}/loss"]) for r in rows if f"{role_name}/loss" in r)
        assert any(not torch.equal(before[k], after[k]) for k in before if k[0] == role_name), role_name
        assert role.module.gradient_checkpointing == role.cfg.gradient_checkpointing
        assert (role.ema is not None) == (role.cfg.ema_decay is not None), role_name   # started at ema_start
    if getattr(cfg.algo, "lora_rank", 0):
        for r in cfg.algo.lora_roles:                # only the adapters train
            names = {id(p): n for n, p in trainer.roles[r].module.named_parameters()}
            assert trainer.roles[r].params and all(".lora_" in names[id(p)] for p in trainer.roles[r].params)


# --------------------------------------------------------------- gradient checkpointing + a windowed cache
WINDOWED = ["rolling_forcing", "streaming_long", "self_forcing_pp", "longlive_stage1", "reward_forcing"]


def test_every_windowed_config_with_checkpointing_is_compared():
    """WINDOWED lists every Wan config whose student attends through a window (a ring cache)
    and is trained with gradient checkpointing: the combination the comparison below covers."""
    found = []
    for name in CONFIGS:
        cfg = load_train_config([RECIPES / f"{name}.yaml"])
        window = getattr(cfg.algo, "window_frames", None) or cfg.model_overrides.get("window_frames")
        if window and any(r.gradient_checkpointing for r in cfg.roles.values()):
            found.append(name)
    assert sorted(found) == sorted(WINDOWED)


@pytest.mark.parametrize("name", ["self_forcing", *WINDOWED])     # self_forcing: a full cache, the control
def test_gradient_checkpointing_trains_the_same(name, tiny_wan, tmp_path, monkeypatch):
    """Recomputing a block in backward must see the keys and values its forward saw: the same
    losses, gradient norms and final weights with and without checkpointing (bf16 autocast as
    in the file). Two steps: the generator's update at step 0, the critic's at 0 and 1; one
    micro-batch per update (accumulation only repeats the rollout, and costs 8x)."""
    monkeypatch.chdir(tmp_path)
    runs = {}
    for ckpt in (True, False):
        wan, cfg = miniature(name, tiny_wan, f"max_steps={STEPS}", f"output_dir=ckpt_{ckpt}",
                             "gradient_accumulation_steps=1",
                             f"roles.generator.gradient_checkpointing={str(ckpt).lower()}",
                             f"roles.critic.gradient_checkpointing={str(ckpt).lower()}")
        trainer = Trainer(cfg)
        assert trainer.roles["generator"].module.gradient_checkpointing == ckpt
        trainer.run()
        rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
        runs[ckpt] = rows, trainable_params(trainer)
    (rows_a, weights_a), (rows_b, weights_b) = runs[True], runs[False]
    for a, b in zip(rows_a, rows_b):
        for k in a:
            if k.endswith(("/loss", "/grad_norm")):
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (k, a[k], b[k])
    for k in weights_a:
        torch.testing.assert_close(weights_a[k], weights_b[k], rtol=1e-6, atol=1e-9, msg=lambda m: f"{k}: {m}")


# --------------------------------------------------------------- LongLive's two stages as documented
def test_longlive_stage_instructions_run_as_written(tiny_wan, tmp_path, monkeypatch):
    """streaming_long.yaml's header commands (stage 1, then stage 2 from its run) run in
    miniature; stage 2 starts from stage 1's generator and critic."""
    monkeypatch.chdir(tmp_path)
    header = [line.lstrip("# ").strip() for line in (RECIPES / "streaming_long.yaml").read_text().splitlines()
              if line.startswith("#")]
    commands = [shlex.split(line)[2:] for line in header if line.startswith("forcelab distill ")]
    assert len(commands) == 2
    trained = None
    for argv in commands:
        files, overrides = split_args(argv)
        assert len(files) == 1 and files[0].startswith("configs/recipes/")
        _, cfg = miniature(Path(files[0]).stem, tiny_wan, f"max_steps={STEPS}", *overrides)
        trainer = Trainer(cfg)
        if trained is not None:                     # stage 2: its roles start where stage 1 ended
            # LongLive's sequences: 21 + 18 k <= 240 frames, a switch at a step start in 21, 39, ..., 201
            assert trainer.recipe.length == 237 and trainer.recipe.switch_candidates == list(range(21, 202, 18))
            assert cfg.roles["generator"].init == cfg.roles["critic"].init == trained[0]
            for role in ("generator", "critic"):
                start = trainer.roles[role].module.state_dict()
                assert all(torch.equal(start[k], v) for k, v in trained[1][role].items()), role
        trainer.run()
        trained = (cfg.output_dir, {r: {k: v.clone() for k, v in trainer.roles[r].module.state_dict().items()}
                                    for r in ("generator", "critic")})


# --------------------------------------------------------------- Rolling Forcing's rollout lengths
def test_rolling_forcing_rollouts_cover_21_24_and_27_frames(tiny_wan, tmp_path, monkeypatch):
    """The published chunk draw: uniform over {21 / 3 .. 27 / 3} = {7, 8, 9} chunks, so the
    21-frame rollout (no re-encoded first frame) is trained as well as the longer ones."""
    monkeypatch.chdir(tmp_path)
    _, cfg = miniature("rolling_forcing", tiny_wan)
    recipe = Trainer(cfg).recipe
    frames = [recipe.draw_rollout(StepContext(step, micro, cfg.seed, [0], torch.device("cpu")))[0]
              for step in range(100) for micro in range(3)]
    counts = {f: frames.count(f) for f in set(frames)}
    assert sorted(counts) == [21, 24, 27] and min(counts.values()) >= 70, counts      # 100 each expected
