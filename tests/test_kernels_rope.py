"""Fused QK RMSNorm + RoPE (Triton) against float64 autograd of the torch reference.

TRITON_INTERPRET is set before forcelab's Triton modules are imported (lazily, on the first
triton call); see tests/test_kernels_attention.py.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from forcelab.kernels.rope import qk_norm_rope, qk_norm_rope_reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = 1e-6
# Relative to the values (RMS-normalised, times weights ~N(1, 0.5)): one or two roundings to
# the 16-bit dtype, the same ones the torch reference makes in that dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_inputs(batch, length, heads, head_dim, dtype, weight_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(batch, length, heads * head_dim, generator=gen) + 0.5).to(dtype)
    weight = (1 + 0.5 * torch.randn(heads * head_dim, generator=gen)).to(weight_dtype)
    angles = 10 * torch.rand(length, head_dim // 2, generator=gen, dtype=torch.float64)
    return x, weight, angles.cos().float(), angles.sin().float()


def check(x, weight, cos, sin, heads, make_x=None):
    """Kernel forward/backward vs the float64 reference on the same (rounded) inputs."""
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    want = qk_norm_rope_reference(x64, w64, cos.double(), sin.double(), EPS, heads)
    d_out = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    d_out = d_out.to(out_dtype)
    want_dx, want_dw = torch.autograd.grad(want, (x64, w64), d_out.double())

    xd = x.to(DEVICE).requires_grad_()
    wd = weight.to(DEVICE).requires_grad_()
    got = qk_norm_rope(make_x(xd) if make_x else xd, wd, cos.to(DEVICE), sin.to(DEVICE), EPS,
                       heads, backend="triton")
    dx, dw = torch.autograd.grad(got, (xd, wd), d_out.to(DEVICE))
    assert got.dtype == out_dtype and got.shape == want.shape
    for name, g, w, dtype in (("out", got, want, out_dtype), ("dx", dx, want_dx, x.dtype),
                              ("dw", dw, want_dw, weight.dtype)):
        tol = max(TOLERANCE[x.dtype], TOLERANCE[dtype])
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.double().cpu(), w.detach(), atol=tol, rtol=tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype,weight_dtype", [
    (torch.float32, torch.float32), (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32)], ids=lambda d: str(d).replace("torch.", ""))
def test_matches_reference(dtype, weight_dtype):
    check(*make_inputs(2, 13, 3, 32, dtype, weight_dtype), heads=3)


@pytest.mark.parametrize("heads,head_dim,length", [(2, 16, 5), (5, 64, 5), (12, 128, 37)])
def test_widths(heads, head_dim, length):
    """Widths that are not powers of two (the kernel pads the row), up to Wan-1.3B's 1536;
    at that width 37 rows take several row tiles, the last one partial, in both kernels."""
    check(*make_inputs(1, length, heads, head_dim, torch.float32, torch.float32), heads=heads)


def test_strided_rows():
    """x as a view of a packed [B, L, 2, C] q/k projection (row stride 2C)."""
    x, weight, cos, sin = make_inputs(2, 7, 4, 32, torch.bfloat16, torch.bfloat16)
    check(x, weight, cos, sin, heads=4,
          make_x=lambda t: torch.stack((t, torch.zeros_like(t)), dim=2)[:, :, 0])


@pytest.mark.parametrize("bad,match", [
    (dict(weight=torch.ones(95)), "weight must be"),
    (dict(cos=torch.ones(13, 15)), "cos must be"),
    (dict(x=torch.ones(13, 96)), "x must be"),
    (dict(x=torch.ones(2, 13, 96, dtype=torch.float64)), "must be one of"),
])
def test_errors_name_the_tensor(bad, match):
    x, weight, cos, sin = make_inputs(2, 13, 3, 32, torch.float32, torch.float32)
    args = dict(x=x, weight=weight, cos=cos, sin=sin)
    args.update(bad)
    args = {k: t.to(DEVICE) for k, t in args.items()}
    with pytest.raises(ValueError, match=match):
        qk_norm_rope(args["x"], args["weight"], args["cos"], args["sin"], EPS, 3,
                     backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs CUDA and compiled (not interpreted) Triton")
def test_gpu_wan_width():
    check(*make_inputs(2, 1560, 12, 128, torch.bfloat16, torch.float32), heads=12)
