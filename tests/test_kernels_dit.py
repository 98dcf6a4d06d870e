"""The toy CausalDiT end to end: attention_backend="triton" equals "torch".

Covers the kernels as the model calls them: fused QK norm + RoPE and block-causal attention
(forward and every parameter's gradient), and cached streaming passes. TRITON_INTERPRET is
set before forcelab's Triton modules are imported (lazily, on the first triton call); see
tests/test_kernels_attention.py.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from forcelab.models import CausalDiT, DiTConfig  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# fp32 model; both backends accumulate in fp32 but in different orders, over 2 layers
MAX_REL = 1e-5
MAX_REL_GRAD = 1e-4
B, H, W = 2, 8, 6  # latent grid 8 x 6 -> 12 tokens per frame (patch 2 x 2)


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def toy_inputs(frames, seed=0):
    torch.manual_seed(seed)
    model = CausalDiT(DiTConfig.preset("toy")).to(DEVICE)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, model.config.in_channels, frames, H, W, generator=gen).to(DEVICE)
    t = (torch.rand(B, frames, generator=gen) * 1000).to(DEVICE)
    ctx = torch.randn(B, 9, 32, generator=gen).to(DEVICE)
    return model, x, t, ctx


@pytest.mark.parametrize("chunk,window,sink", [(None, None, 0), (2, None, 0), (2, 4, 1)])
def test_forward_and_gradients_match(chunk, window, sink):
    model, x, t, ctx = toy_inputs(frames=6)
    outs, grads = {}, {}
    for backend in ("torch", "triton"):
        model.zero_grad()
        out = model(x, t, ctx, chunk_frames=chunk, window_frames=window, sink_frames=sink,
                    attention_backend=backend)
        out.square().mean().backward()
        outs[backend] = out.detach()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None}
    assert max_rel(outs["triton"], outs["torch"]) <= MAX_REL
    assert grads["triton"].keys() == grads["torch"].keys()
    for name, want in grads["torch"].items():
        if want.abs().max() > 0:
            assert max_rel(grads["triton"][name], want) <= MAX_REL_GRAD, name


def test_streaming_matches():
    """Cache reads (with empty slots, sink and window) and commits, both backends."""
    frames, chunk = 8, 2
    model, x, t, ctx = toy_inputs(frames, seed=1)
    outs = {}
    with torch.no_grad():
        for backend in ("torch", "triton"):
            cache = model.new_cache(B, H, W, chunk_frames=chunk, window_frames=4, sink_frames=1)
            model.set_prompt(cache, ctx)
            chunks = []
            for s in range(0, frames, chunk):
                sl = slice(s, s + chunk)
                chunks.append(model(x[:, :, sl], t[:, sl], cache=cache,
                                    attention_backend=backend))
                model(x[:, :, sl], t[:, sl] * 0, cache=cache, commit=True,
                      attention_backend=backend)
            outs[backend] = torch.cat(chunks, dim=2)
    assert max_rel(outs["triton"], outs["torch"]) <= MAX_REL
