"""Frame-wise students (one latent frame per chunk, Causal Forcing++): every toy config under
configs/toy/framewise/ loads with the student at chunk_frames 1, runs one update of every
trainable role, and the frame-wise student streams one frame per chunk through the engine and
through generate."""

import json

import pytest
import torch

from forcelab.models.plans import Chunkwise
from forcelab.models.rollout import Noise, rollout, stream
from forcelab.pipeline import TOY_CONFIGS
from forcelab.train.config import load_train_config
from forcelab.train.trainer import Trainer

CONFIGS = sorted((TOY_CONFIGS / "framewise").glob("*.yaml"))
TINY = ["model_overrides.dim=32", "model_overrides.ffn_dim=64", "model_overrides.num_layers=1",
        "model_overrides.num_heads=2", "logging.wandb=disabled", "logging.progress=false", "max_steps=1",
        "data.batch_size=1", "data.frames=4", "checkpoint.every=0"]
SHORT = {   # per recipe: the same settings at test size (4 frames, a 4-step teacher, one pair)
    "ode_init": ["algo.num_pairs=1", "algo.pairs_per_shard=1", "algo.pairs_batch=1", "algo.teacher_steps=4",
                 "algo.stored_steps=[0,1,2,3,-1]"],
    "causal_cd": ["algo.cd_steps=4"],
    "self_forcing": ["algo.frames=4"],
    "causvid": ["algo.frames=4"],
}


def test_every_framewise_config_is_tested():
    names = {p.stem for p in CONFIGS}
    assert {"self_forcing_1step", "self_forcing_2step", "self_forcing_4step", "ode_init", "causal_ode_init",
            "causal_cd", "causvid"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_framewise_config_runs_one_update(path, tiny_teacher, tmp_path):
    recipe = load_train_config([path]).recipe
    cfg = load_train_config([path], [f"roles.teacher.init={tiny_teacher(layers=1)}", *TINY, *SHORT.get(recipe, []),
                                     f"output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    gen = trainer.module("generator")
    assert gen.config.chunk_frames == 1
    before = {k: p.detach().clone() for k, p in gen.named_parameters()}
    trainer.run()
    assert trainer.step == 1
    assert any(not torch.equal(before[k], p) for k, p in gen.named_parameters())      # the generator updated
    if recipe == "self_forcing":
        steps = int(path.stem.split("_")[-1].removesuffix("step"))
        assert len(trainer.recipe.timesteps) == steps
    if path.stem == "self_forcing_1step":
        _framewise_generate_streams(trainer, tmp_path)


def _framewise_generate_streams(trainer, tmp_path):
    """The 1-step frame-wise student: one committed chunk per latent frame, the stream equal to
    the collected rollout, and generate writes the video with the plan in its sidecar."""
    from forcelab.generate import generate

    gen = trainer.module("generator").eval()
    plan = Chunkwise(timesteps=[1000.0])
    emb, _ = trainer.text_encoder.encode(["a red ball moving slowly"])
    noise = Noise([3], gen.config.in_channels, 4, 4)
    with torch.no_grad():
        chunks = list(stream(gen, plan, emb, noise, 4))
        whole = rollout(gen, plan, emb, noise, 4).x0
    assert [(c.start, c.x.shape[2]) for c in chunks] == [(0, 1), (1, 1), (2, 1), (3, 1)]
    torch.testing.assert_close(torch.cat([c.x for c in chunks], dim=2), whole)
    videos = generate(trainer.run_dir, ["a red ball moving slowly"], plan=plan, frames=4, output=tmp_path / "v",
                      progress=False)
    side = json.loads(videos[0].sidecar_path.read_text())
    assert side["frames"] == 4 and side["model_config"]["chunk_frames"] == 1
