"""CausalDiT equals diffusers' WanTransformer3DModel (the public reference implementation)."""

import pytest
import torch

from forcelab.models import CausalDiT

diffusers = pytest.importorskip("diffusers")

CONFIGS = [
    # (heads, head_dim, layers, frames, height, width)
    (2, 32, 2, 3, 8, 8),
    (2, 32, 1, 5, 6, 10),   # odd frame count, non-square
    (3, 24, 2, 2, 4, 12),   # head dim not a power of two
]
TEXT_DIM, TEXT_LEN, CHANNELS = 32, 16, 16


def tiny_diffusers(heads, head_dim, layers, seed=0):
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
        in_channels=CHANNELS, out_channels=CHANNELS, text_dim=TEXT_DIM, freq_dim=64, ffn_dim=96,
        num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads")
    # diffusers zero-initialises some biases/norms; randomise everything so no path hides
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == heads * head_dim else 0.0))
    return model.eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("heads,head_dim,layers,frames,height,width", CONFIGS)
def test_matches_diffusers(tmp_path, heads, head_dim, layers, frames, height, width):
    ref = tiny_diffusers(heads, head_dim, layers)
    ref.save_pretrained(tmp_path / "ckpt")
    ours = CausalDiT.from_pretrained(tmp_path / "ckpt", text_len=TEXT_LEN)
    g = torch.Generator().manual_seed(1)
    B = 2
    x = torch.randn(B, CHANNELS, frames, height, width, generator=g)
    ctx = torch.randn(B, TEXT_LEN, TEXT_DIM, generator=g)
    t = torch.tensor([999.0, 137.5])
    with torch.no_grad():
        expect = ref(x, t, ctx).sample
        got = ours(x, t, ctx)
        assert rel_err(got, expect) <= 1e-4

        # per-frame timesteps: diffusers takes them per token [B, F * H * W / 4]
        tf = torch.rand(B, frames, generator=g) * 1000
        per_token = tf.repeat_interleave(height * width // 4, dim=1)
        expect = ref(x, per_token, ctx).sample
        got = ours(x, tf, ctx)
        assert rel_err(got, expect) <= 1e-4


def test_short_context_is_zero_padded_like_wan(tmp_path):
    ref = tiny_diffusers(2, 32, 1)
    ref.save_pretrained(tmp_path / "ckpt")
    ours = CausalDiT.from_pretrained(tmp_path / "ckpt", text_len=TEXT_LEN)
    x = torch.randn(1, CHANNELS, 2, 4, 4)
    ctx = torch.randn(1, 5, TEXT_DIM)
    padded = torch.cat([ctx, torch.zeros(1, TEXT_LEN - 5, TEXT_DIM)], dim=1)
    with torch.no_grad():
        assert rel_err(ours(x, torch.tensor([500.0]), ctx), ref(x, torch.tensor([500.0]), padded).sample) <= 1e-4
