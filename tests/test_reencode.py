"""The first-frame re-encode of a DMD window follows the public treatment: the latents up to
and including the window's first are decoded TOGETHER and the last pixel frame is encoded
alone. A temporally compressing codec (toy, Wan-like stride 4) tells this apart from decoding
the window's first latent on its own; the stride-1 toy codec cannot (so its results stand).
Each recipe is checked against the public code's slicing written out plainly here."""

import pytest
import torch

from forcelab.distill.dmd_recipe import reencode_first
from forcelab.models.autoencoder import ToyCodec, load_autoencoder
from forcelab.models.rollout import Training, rollout
from forcelab.train.config import load_train_config
from forcelab.train.recipe import StepContext
from forcelab.train.trainer import Trainer

CPU = torch.device("cpu")
WAN_LIKE = "toy:6:4:4"      # the toy cell transform with Wan's causal temporal stride 4


def public_first_latent(codec, video, window):
    """Self-Forcing's model/base.py, literally: decode video[:, :-(window - 1)] (frames on
    dim 2 here), keep the last pixel frame, encode it alone. video [B, C, F, H, W]."""
    latent_to_decode = video[:, :, :-(window - 1)]
    pixels = codec.decode(latent_to_decode).clamp(-1, 1)
    frame = pixels[:, :, -1:]
    return codec.encode(frame)


def alone_first_latent(codec, latent):
    """The old treatment: the window's first latent decoded on its own, its first pixel frame
    encoded. latent [B, C, 1, H, W]."""
    return codec.encode(codec.decode(latent)[:, :, :1].clamp(-1, 1))


def test_the_codec_is_causal_and_compresses_time_like_wan():
    codec = load_autoencoder(WAN_LIKE)
    z = torch.randn(2, 6, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    video = codec.decode(z)
    assert codec.temporal_stride == 4 and video.shape[2] == 1 + 4 * 4
    assert torch.allclose(codec.encode(video), z, atol=1e-5)                    # exact on its own output
    later = z.clone()
    later[:, :, 3:] += 1.0
    assert torch.equal(codec.decode(later)[:, :, :1 + 4 * 2], video[:, :, :1 + 4 * 2])   # causal
    stream = codec.decode_stream()
    streamed = torch.cat([stream.push(z[:, :, :1]), stream.push(z[:, :, 1:3]), stream.push(z[:, :, 3:])], dim=2)
    assert torch.allclose(streamed, video, atol=1e-6)


def test_reencode_is_the_public_treatment_and_differs_from_decoding_alone():
    video = torch.randn(2, 6, 9, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5
    window = 4
    first = video.shape[2] - window                         # the window's first latent
    wan_like, per_frame = load_autoencoder(WAN_LIKE), ToyCodec()
    new = reencode_first(wan_like, video[:, :, :first + 1])
    assert torch.allclose(new, public_first_latent(wan_like, video, window), atol=1e-6)        # (a)
    alone = alone_first_latent(wan_like, video[:, :, first:first + 1])
    assert (new - alone).abs().max() > 0.1                                                    # (b)
    # the codec's memory reaches past the latent before (as Wan's does): all of it counts
    assert (new - reencode_first(wan_like, video[:, :, first - 1:first + 1])).abs().max() > 0.01
    same = reencode_first(per_frame, video[:, :, :first + 1])
    assert torch.allclose(same, alone_first_latent(per_frame, video[:, :, first:first + 1]), atol=1e-6)   # (c)
    assert torch.allclose(same, public_first_latent(per_frame, video, window), atol=1e-6)


@pytest.fixture(scope="module")
def teacher_dir(tiny_teacher):
    return tiny_teacher(layers=1)


def make_trainer(tmp_path, teacher_dir, *extra):
    return Trainer(load_train_config([], [
        f"roles.teacher.init={teacher_dir}", f"vae={WAN_LIKE}", "data.batch_size=1", "data.frames=8",
        "logging.wandb=disabled", "logging.progress=false", f"output_dir={tmp_path / 'run'}", *extra]))


def test_self_forcing_decodes_every_latent_up_to_the_window(tmp_path, teacher_dir):
    trainer = make_trainer(tmp_path, teacher_dir, "recipe=self_forcing", "algo.frames=4", "algo.min_chunks=4",
                           "algo.max_chunks=4")
    recipe, codec = trainer.recipe, trainer.codec
    batch, positions = trainer.next_batch()
    ctx = StepContext(0, 0, 0, positions, CPU)
    frames, exit_step = recipe.draw_rollout(ctx)
    with torch.no_grad():
        out = recipe.generate(batch, ctx, grad=False)
        # the same rollout again, whole: what the public code holds when it re-encodes
        video = recipe.student_rollout(batch, ctx, frames, training=Training(exit_step, grad_from_frame=frames - 4),
                                       plan=recipe.rollout_plan(ctx)).x0
    assert frames == 8 and torch.equal(out.x0[:, :, 1:], video[:, :, -3:])
    assert torch.allclose(out.x0[:, :, :1], public_first_latent(codec, video, 4), atol=1e-5)
    assert (out.x0[:, :, :1] - alone_first_latent(codec, video[:, :, 4:5])).abs().max() > 0.05


def test_streaming_long_decodes_its_previous_window_as_longlive(tmp_path, teacher_dir):
    trainer = make_trainer(tmp_path, teacher_dir, "recipe=streaming_long", "algo.frames=4", "algo.new_frames=2",
                           "algo.max_frames=9", "algo.switch=false")
    recipe, codec = trainer.recipe, trainer.codec
    batch, positions = trainer.next_batch()
    stream = None                                   # every latent generated so far, as generated
    with torch.no_grad():
        for step in range(3):                       # steps start at frames 0, 4, 6
            ctx = StepContext(step, 0, trainer.cfg.seed, positions, CPU)
            if step == 0:
                recipe.start_sequence(ctx)
            out = recipe.generate(batch, ctx, grad=False)
            if stream is None:
                stream = out.x0                     # the first window has no overlap: nothing re-encoded
                continue
            overlap, new = 2, out.x0[:, :, 2:]
            assert out.mask[0].tolist() == [False, False, True, True]          # only the new frames count
            # LongLive's model/streaming_training.py: the last `frames` latents so far (its
            # previous_frames) + the new ones, decoded up to the window's first (chunk_size 4)
            full_chunk = torch.cat([stream[:, :, -4:], new], dim=2)
            assert torch.allclose(out.x0[:, :, :1], public_first_latent(codec, full_chunk, 4), atol=1e-5)
            assert torch.equal(out.x0[:, :, 1:overlap], stream[:, :, -(overlap - 1):])
            window_first = stream[:, :, -overlap:][:, :, :1]
            assert (out.x0[:, :, :1] - alone_first_latent(codec, window_first)).abs().max() > 0.05
            stream = torch.cat([stream, new], dim=2)
    assert stream.shape[2] == 8


def test_self_forcing_pp_decodes_the_teacher_horizon_before_its_window(tmp_path, teacher_dir):
    T, start = 4, 6
    trainer = make_trainer(tmp_path, teacher_dir, "recipe=self_forcing_pp", f"algo.frames={T}",
                           "algo.rollout_frames=12", "algo.steps=[1000,750,500]")
    recipe, codec, model = trainer.recipe, trainer.codec, trainer.module("generator")
    batch, positions = trainer.next_batch()
    ctx = StepContext(0, 0, 0, positions, CPU)
    recipe.draw_window = lambda ctx: (start, 1)
    with torch.no_grad():
        out = recipe.generate(batch, ctx, grad=False)
        recipe.opt.reencode_first = False
        raw = recipe.generate(batch, ctx, grad=False).x0            # the same window, first latent as made
        recipe.opt.reencode_first = True
        long = rollout(model, recipe.plan(), batch["text_emb"], recipe.noise(ctx), start).x0
    video = torch.cat([long, raw], dim=2)                           # frames [0, start + T)
    # the public slicing over the last T - 1 latents before the window and the window
    assert torch.allclose(out.x0[:, :, :1], public_first_latent(codec, video[:, :, start - (T - 1):], T), atol=1e-5)
    assert torch.equal(out.x0[:, :, 1:], raw[:, :, 1:])
    assert (out.x0[:, :, :1] - alone_first_latent(codec, raw[:, :, :1])).abs().max() > 0.05
