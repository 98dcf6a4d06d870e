"""Recipe-level properties checked against independent computations: the teacher-forcing
forward equals a plain block-causal forward over [clean context, noisy chunk]; AR-Diffusion's
forward never lets a frame see a later one; its levels are non-decreasing."""

import torch

from forcelab.models.config import DiTConfig
from forcelab.models.dit import CausalDiT
from forcelab.train.config import load_train_config
from forcelab.train.recipe import StepContext
from forcelab.train.trainer import Trainer

TINY = ["model_overrides.dim=32", "model_overrides.ffn_dim=64", "model_overrides.num_layers=2",
        "model_overrides.num_heads=2", "data.frames=6", "data.batch_size=2", "logging.wandb=disabled",
        "logging.progress=false"]


def tiny_model(**kw):
    torch.manual_seed(0)
    cfg = DiTConfig.preset("toy", dim=32, ffn_dim=64, num_layers=2, num_heads=2, **kw)
    return CausalDiT(cfg).eval()


def test_teacher_forcing_forward_equals_block_causal_over_clean_context():
    model = tiny_model()
    C, F, H, W = model.config.in_channels, 6, 4, 4
    chunk = 2
    clean, noisy = torch.randn(1, C, F, H, W), torch.randn(1, C, F, H, W)
    t_noisy = torch.tensor([[700.0, 700, 300, 300, 900, 900]])
    ctx = torch.randn(1, 5, model.config.text_dim)
    with torch.no_grad():
        both = model(torch.cat([clean, noisy], 2), torch.cat([torch.zeros(1, F), t_noisy], 1), ctx,
                     chunk_frames=chunk, teacher_forcing=True)[:, :, F:]
        for c in range(F // chunk):
            lo, hi = c * chunk, (c + 1) * chunk
            x = torch.cat([clean[:, :, :lo], noisy[:, :, lo:hi]], 2)
            t = torch.cat([torch.zeros(1, lo), t_noisy[:, lo:hi]], 1)
            ref = model(x, t, ctx, chunk_frames=chunk)[:, :, lo:hi]
            assert torch.allclose(both[:, :, lo:hi], ref, atol=1e-5, rtol=1e-4), c


def test_ar_diffusion_sees_no_future_frame_and_levels_do_not_decrease(tmp_path):
    cfg = load_train_config([], TINY + ["recipe=ar_diffusion", "algo.num_levels=30", f"output_dir={tmp_path}/r"])
    trainer = Trainer(cfg)
    recipe = trainer.recipe
    ctx = StepContext(0, 0, 0, list(range(8)), torch.device("cpu"))
    levels = recipe.levels(ctx, 6)
    assert levels.shape == (8, 6) and (levels[:, 1:] >= levels[:, :-1]).all()
    assert levels.min() >= 0 and levels.max() < 30 and len({tuple(r) for r in levels.tolist()}) > 1
    model = trainer.module("generator").eval()
    C, h, w = model.config.in_channels, 8, 8
    x = torch.randn(1, C, 6, h, w)
    sigma = torch.linspace(0.1, 0.9, 6)[None]
    text = torch.randn(1, 4, model.config.text_dim)
    with torch.no_grad():
        base = recipe.predict(model, x, sigma, text)
        for k in range(1, 6):
            y = x.clone()
            y[:, :, k:] += torch.randn_like(y[:, :, k:])
            out = recipe.predict(model, y, sigma, text)
            assert torch.equal(out[:, :, :k], base[:, :, :k]), k       # earlier frames unchanged
            assert not torch.allclose(out[:, :, k], base[:, :, k])      # the perturbed frame is seen
