"""LongLive streaming long tuning against its plain reference (tests/plain_recipes/
streaming_long.py): five consecutive loss calls of one trainer - generator and critic calls
alternating, the sequence state carried by each side on its own - cover the first window,
continuation windows with overlap, a prompt switch with KV recache (the sink kept, the recent
frames re-run at context_noise with the new prompt, the teacher judging with it) and a new
sequence at the maximum length, with the sink kept at the switch and wiped (the public
training code). Every call: the same loss and the same generator and critic gradients. A 2-layer DiT, so that cached keys depend on the prompt they were written with."""

from dataclasses import replace

import pytest
import torch

from forcelab.train.config import load_train_config
from forcelab.train.data import make_stream
from forcelab.train.recipe import StepContext
from forcelab.train.trainer import Trainer
from plain_recipes.compare import assert_same, loss_and_grads
from plain_recipes.rolling_forcing import Scores
from plain_recipes.streaming_long import PlainStreamingLong, StreamOptions

C, FRAMES, NEW, MAX, WINDOW, SINK, CONTEXT_NOISE, SEED = 2, 6, 2, 12, 4, 2, 40.0, 0
SWITCH = 8          # call starts 6, 8, 10; the switch recaches frames [2, 8) = everything after the sink
OPTIONS = StreamOptions(steps=[1000.0, 750.0, 500.0], warp_shift=5.0, frames=FRAMES, new_frames=NEW,
                        max_frames=MAX, chunk=C, window=WINDOW, sink=SINK, context_noise=CONTEXT_NOISE,
                        switch_frames=[SWITCH])
CALLS = ["generator", "critic", "generator", "critic", "generator"]   # starts 0, 6, 8 (switch), 10, 0 (new sequence)


@pytest.fixture(scope="module", params=[True, False], ids=["sink_kept", "sink_wiped"])
def trainer(request, tmp_path_factory, tiny_teacher):
    """keep_sink true: forcelab's default (LongLive's inference); false: the public training code."""
    out = tmp_path_factory.mktemp("sl_ref")
    return Trainer(load_train_config([], [
        "recipe=streaming_long", f"roles.teacher.init={tiny_teacher(layers=2)}", "data.batch_size=2",
        "algo.steps=[1000,750,500]", f"algo.frames={FRAMES}", f"algo.new_frames={NEW}", f"algo.max_frames={MAX}",
        f"algo.window_frames={WINDOW}", f"algo.sink_frames={SINK}", f"algo.context_noise={CONTEXT_NOISE}",
        f"algo.switch_frames=[{SWITCH}]", f"algo.keep_sink={request.param}", f"seed={SEED}", "logging.wandb=disabled", "logging.progress=false",
        f"output_dir={out / 'run'}"]))


def test_streaming_long_calls_equal_the_plain_reference(trainer):
    gen, critic = trainer.module("generator"), trainer.module("critic")
    prompts = make_stream(trainer.cfg, "prompts", trainer.codec, trainer.text_encoder)
    grid = 32 // trainer.codec.spatial_stride
    reference = PlainStreamingLong(
        replace(OPTIONS, keep_sink=trainer.cfg.algo.keep_sink), gen, trainer.codec, Scores(trainer.module("teacher"), critic, trainer.negative, guidance=4.0),
        lambda positions: prompts.batch(positions)["text_emb"], (gen.config.in_channels, grid, grid))
    recipe, starts = trainer.recipe, []
    for step, role in enumerate(CALLS):
        batch, positions = trainer.next_batch()
        ctx = StepContext(step, 0, SEED, positions, torch.device("cpu"), role=role)
        got = loss_and_grads(lambda: recipe.loss(role, batch, ctx)[0], [gen, critic])
        ref = loss_and_grads(lambda: reference.loss(role, ctx), [gen, critic])
        starts.append(reference.end - (FRAMES if reference.end == FRAMES else NEW))
        assert recipe.seq.end == reference.end and torch.equal(recipe.seq.prompt, reference.prompt), step
        assert ref[1].norm() > 0
        assert_same(got, ref, rtol=1e-5, what=(step, role))
    assert starts == [0, 6, 8, 10, 0]
