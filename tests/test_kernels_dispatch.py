"""Backend choice and errors of `attention` / `qk_norm_rope`; Triton through `attention()`.

TRITON_INTERPRET is set before forcelab's Triton modules are imported (lazily, on the first
triton call); see tests/test_kernels_attention.py.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from forcelab.kernels import AttentionLayout, attention, dispatch, qk_norm_rope  # noqa: E402
from forcelab.kernels.reference import attention_reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not dispatch.triton_installed(), reason="needs triton")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

LAYOUTS = {
    "block_causal": AttentionLayout.block_causal(6, 11, chunk_frames=2, window_frames=4,
                                                 sink_frames=1),
    "teacher_forcing": AttentionLayout.teacher_forcing(4, 9, chunk_frames=2),
    "cached_dense": AttentionLayout.cached([4, 5], [0, 1, 2, 3, 4, 5], 9, chunk_frames=2),
    "cached_empty_slot": AttentionLayout.cached([4, 5], [0, -1, 2, 3, 4, 5], 9, chunk_frames=2),
}


def qkv(layout, dtype=torch.float32, heads=2, head_dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(2, layout.num_queries, heads, head_dim)] + [(2, layout.num_keys, heads,
                                                            head_dim)] * 2
    return [torch.randn(s, generator=gen).to(dtype).to(DEVICE) for s in shapes]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_triton_backend_equals_torch_backend(name, dtype):
    layout = LAYOUTS[name]
    results = {}
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in qkv(layout, dtype)]
        out = attention(*leaves, layout, backend=backend)
        out.float().square().sum().backward()
        results[backend] = [out] + [t.grad for t in leaves]
    tol = TOLERANCE[dtype]
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@needs_triton
def test_qk_norm_rope_backends_agree():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 96, generator=gen).to(DEVICE)
    weight = torch.randn(96, generator=gen).to(DEVICE)
    angles = torch.rand(9, 16, generator=gen).to(DEVICE)
    args = (x, weight, angles.cos(), angles.sin(), 1e-6, 3)
    torch.testing.assert_close(qk_norm_rope(*args, backend="triton"),
                               qk_norm_rope(*args, backend="torch"), atol=1e-5, rtol=1e-5)


def test_automatic_backend():
    cpu = torch.zeros(1)
    assert dispatch.resolve_backend(None, cpu, "attention") == "torch"
    if torch.cuda.is_available() and dispatch.triton_installed():
        assert dispatch.resolve_backend(None, cpu.cuda(), "attention") == "triton"
        # inputs the kernels do not support fall back to the reference
        assert dispatch.resolve_backend(None, cpu.cuda(), "attention", False) == "torch"
        q = torch.randn(1, 8, 2, 24, device="cuda")  # head dim 24: not a kernel size
        layout = AttentionLayout.full(2, 4)
        torch.testing.assert_close(attention(q, q, q, layout),
                                   attention(q, q, q, layout, backend="torch"))


def test_without_triton(monkeypatch):
    """What a macOS install sees: automatic -> torch, "triton" -> a clear error."""
    monkeypatch.setattr(dispatch, "triton_installed", lambda: False)
    layout = LAYOUTS["cached_dense"]
    q, k, v = qkv(layout)
    assert dispatch.resolve_backend(None, q, "attention") == "torch"
    with pytest.raises(ValueError, match="Linux"):
        attention(q, k, v, layout, backend="triton")


@pytest.mark.parametrize("change,match", [
    (lambda q, k, v: (q[0], k, v), "q must be"),
    (lambda q, k, v: (q, k, v[:, :-1]), "same shape"),
    (lambda q, k, v: (q[..., :16], k, v), "head dim"),
    (lambda q, k, v: (q, k.double(), v), "dtypes differ"),
    (lambda q, k, v: (q[:, :-1], k, v), "layout describes"),
    (lambda q, k, v: (q, k, v), "unknown attention backend"),
])
def test_shape_errors_name_the_tensor(change, match):
    layout = LAYOUTS["block_causal"]
    backend = "flash" if "unknown" in match else "torch"
    with pytest.raises(ValueError, match=match):
        attention(*change(*qkv(layout)), layout, backend=backend)


@needs_triton
@pytest.mark.parametrize("dtype,head_dim,match", [(torch.float32, 48, "head dim 48"),
                                                  (torch.float64, 32, "float64")])
def test_triton_limits(dtype, head_dim, match):
    layout = LAYOUTS["block_causal"]
    with pytest.raises(ValueError, match=match):
        attention(*qkv(layout, dtype, head_dim=head_dim), layout, backend="triton")


def run_without_interpreter(script: str) -> None:
    """Run a Python script in a fresh process whose environment lacks TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@needs_triton
def test_import_is_lazy_and_cpu_needs_the_interpreter():
    """In a fresh process without TRITON_INTERPRET: importing forcelab.kernels leaves triton
    unimported, and backend="triton" on CPU tensors says how to enable the interpreter."""
    script = (
        "import sys, torch\n"
        "from forcelab.kernels import AttentionLayout, attention\n"
        "assert 'triton' not in sys.modules, 'forcelab.kernels imported triton eagerly'\n"
        "q = torch.zeros(1, 4, 1, 32)\n"
        "try:\n"
        "    attention(q, q, q, AttentionLayout.full(1, 4), backend='triton')\n"
        "except ValueError as e:\n"
        "    assert 'TRITON_INTERPRET=1' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n")
    run_without_interpreter(script)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check (CPU machines)")
def test_interpreter_after_triton_was_imported():
    """torch._dynamo (diffusers, torch.compile) imports triton before TRITON_INTERPRET is set:
    the interpreted kernels must still run (triton's library is re-wrapped)."""
    script = (
        "import torch._dynamo, os, torch\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from forcelab.kernels import AttentionLayout, attention\n"
        "layout = AttentionLayout.block_causal(4, 5, 2)\n"
        "q = torch.randn(1, 20, 2, 32, dtype=torch.float64).float()\n"
        "diff = attention(q, q, q, layout, 'triton') - attention(q, q, q, layout, 'torch')\n"
        "assert diff.abs().max() < 1e-5, diff.abs().max()\n")
    run_without_interpreter(script)


def test_dense_layouts_go_to_sdpa_without_tables(monkeypatch):
    """Automatic backend: a dense layout never reaches the Triton backend (no visit tables),
    a masked one does (when the automatic choice picks triton)."""
    def no_triton():
        raise AssertionError("the Triton backend was asked for")
    monkeypatch.setattr(dispatch, "triton_backend", no_triton)
    monkeypatch.setattr(dispatch, "resolve_backend", lambda *a, **k: "triton")
    dense = LAYOUTS["cached_dense"]
    q, k, v = qkv(dense)
    torch.testing.assert_close(attention(q, k, v, dense), attention_reference(q, k, v, dense))
    masked = LAYOUTS["cached_empty_slot"]
    with pytest.raises(AssertionError, match="was asked for"):
        attention(*qkv(masked), masked)


def test_automatic_backend_sends_fp32_to_torch():
    assert torch.float32 not in dispatch.TRITON_AUTO_DTYPES
    assert set(dispatch.TRITON_AUTO_DTYPES) == {torch.float16, torch.bfloat16}
