"""Triton attention (forward, dQ, dK, dV) against float64 autograd of the torch reference.

Without CUDA the kernels run on CPU tensors under Triton's interpreter. TRITON_INTERPRET is
read when forcelab's Triton modules are first imported, which `dispatch` does lazily on the
first triton call, so setting it here, at the top of the module (collection time), is early
enough even if another test module imported forcelab.kernels first. With CUDA the same tests
run compiled on the GPU, and the `gpu` tests add Wan-sized shapes.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import random  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from forcelab.kernels import AttentionLayout  # noqa: E402
from forcelab.kernels.reference import attention_reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Kernel vs float64 on the same (rounded) inputs: fp32 accumulation everywhere; 16-bit
# outputs are rounded once more, and P is rounded to the input dtype before P @ V.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
RANDOM_CASES = 16
MAX_TOKENS = 256        # queries and keys of a random case
MAX_TILE_VISITS = 40    # (query tile, key tile) visits x heads: the interpreter's time


def launch():
    from forcelab.kernels.dispatch import triton_backend
    return triton_backend()


def run_case(layout, dtype, batch=2, heads=2, head_dim=32, sizes=None, seed=0, make_qkv=None,
             device=DEVICE):
    """Forward and backward of the kernel and of the float64 reference; compare all four."""
    gen = torch.Generator().manual_seed(seed)
    q_shape = (batch, layout.num_queries, heads, head_dim)
    k_shape = (batch, layout.num_keys, heads, head_dim)
    q, k, v = (torch.randn(s, generator=gen).to(dtype) for s in (q_shape, k_shape, k_shape))
    d_out = torch.randn(q_shape, generator=gen).to(dtype)

    want_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    want_out = attention_reference(*want_leaves, layout)
    want = (want_out, *torch.autograd.grad(want_out, want_leaves, d_out.double()))

    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    inputs = make_qkv(*leaves) if make_qkv else leaves
    out = launch().triton_attention(*inputs, layout, sizes)
    got = (out, *torch.autograd.grad(out, leaves, d_out.to(device)))

    tol = TOLERANCE[dtype]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert torch.isfinite(g).all(), f"{name} has NaN/inf"
        torch.testing.assert_close(g.double().cpu(), w.detach(), atol=tol, rtol=tol,
                                   msg=lambda m, name=name: f"{name} ({dtype}): {m}")


def L(*args, **kwargs):
    return AttentionLayout(torch.tensor(args[0]), torch.tensor(args[1]), *args[2:], **kwargs)


# name -> layout: every constructor and rule branch, frame boundaries inside tiles (odd
# tokens per frame), partial last tiles, skipped tiles, empty cache slots, empty query rows.
NAMED_LAYOUTS = {
    "full": AttentionLayout.full(3, 7),
    "frame_causal": AttentionLayout.block_causal(9, 5, chunk_frames=1),
    "block_causal": AttentionLayout.block_causal(6, 13, chunk_frames=3),
    "window_sink": AttentionLayout.block_causal(8, 7, chunk_frames=2, window_frames=4,
                                                sink_frames=1),
    "window_offset": AttentionLayout.block_causal(7, 9, chunk_frames=2, window_frames=3,
                                                  sink_frames=2, start_frame=3),
    "one_token_frames": AttentionLayout.block_causal(40, 1, chunk_frames=4, window_frames=12),
    "teacher_forcing": AttentionLayout.teacher_forcing(6, 5, chunk_frames=2),
    "teacher_window_sink": AttentionLayout.teacher_forcing(6, 7, chunk_frames=2,
                                                           window_frames=4, sink_frames=1),
    "cached_empty_slots": AttentionLayout.cached([6, 7], [0, -1, 4, 5, -1, 6, 7], 9,
                                                 chunk_frames=2, window_frames=4, sink_frames=1),
    "cached_dense": AttentionLayout.cached([9, 10, 11], [0, 7, 8, 3, 4, 5, 6, 9, 10, 11], 11,
                                           chunk_frames=3),
    # queries of chunk 1 see frames 0..3; queries of chunk 3 see nothing (window 4, no sink)
    "empty_rows": L([2, 3, 6, 7], [-1, 0, 1, 2, 3], 6, chunk_frames=2, window_frames=4),
}


# Every layout in fp32 and in one 16-bit dtype (alternating): the mask logic does not
# depend on the dtype, and the random cases mix both anyway.
NAMED_CASES = [(name, dtype) for i, name in enumerate(NAMED_LAYOUTS)
               for dtype in (torch.float32, DTYPES[1 + i % 2])]


@pytest.mark.parametrize("name,dtype", NAMED_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_named_layouts(name, dtype):
    run_case(NAMED_LAYOUTS[name], dtype, seed=len(name))


def random_layout(rng: random.Random, heads: int = 1) -> AttentionLayout:
    """A random layout of any kind, small enough for the interpreter."""
    while True:
        kind = rng.choices(["block_causal", "teacher_forcing", "cached", "full"],
                           weights=[4, 3, 3, 1])[0]
        tokens = rng.choice([1, 3, 5, 7, 11, 13, 17])
        chunk = rng.randint(1, 4)
        frames = rng.randint(chunk, 4 * chunk + 3)
        window = rng.choice([None, rng.randint(chunk, frames + chunk)])
        sink = rng.choice([0, 0, 1, 2])
        if kind == "full":
            layout = AttentionLayout.full(frames, tokens)
        elif kind == "block_causal":
            layout = AttentionLayout.block_causal(frames, tokens, chunk, window, sink,
                                                  start_frame=rng.randint(0, 3))
        elif kind == "teacher_forcing":
            layout = AttentionLayout.teacher_forcing(frames, tokens, chunk, window, sink)
        else:
            first = chunk * rng.randint(1, 4)
            query = list(range(first, first + chunk))
            slots = [f if rng.random() < 0.8 else -1 for f in range(first)]
            rng.shuffle(slots)
            layout = AttentionLayout.cached(query, slots + query, tokens, chunk, window, sink)
        work = heads * layout.tile_runs(32, 32).num_visits
        if max(layout.num_queries, layout.num_keys) <= MAX_TOKENS and work <= MAX_TILE_VISITS:
            return layout


@pytest.mark.parametrize("case", range(RANDOM_CASES))
def test_random_layouts(case):
    rng = random.Random(1000 + case)
    heads = rng.randint(1, 3)
    layout = random_layout(rng, heads)
    run_case(layout, DTYPES[case % len(DTYPES)], batch=2, heads=heads,
             head_dim=rng.choice([32, 64]), seed=case)


@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_head_dims(head_dim):
    run_case(NAMED_LAYOUTS["window_sink"], torch.bfloat16, heads=3, head_dim=head_dim)
    run_case(NAMED_LAYOUTS["cached_dense"], torch.float32, heads=1, head_dim=head_dim)


@pytest.mark.parametrize("fwd,dkdv,dq", [((16, 16), (16, 16), (16, 16)),
                                         ((64, 32), (32, 64), (16, 64))])
def test_tile_sizes(fwd, dkdv, dq):
    """Other tiles move frame boundaries and full/partial/skipped tiles elsewhere."""
    sizes = launch().TileSizes(*fwd, *dkdv, *dq)
    for name in ("teacher_window_sink", "empty_rows"):
        run_case(NAMED_LAYOUTS[name], torch.float32, sizes=sizes)


def test_strided_inputs():
    """q, k, v as views of one packed [B, L, 3, H, D] projection (the DiT's fused qkv)."""
    def packed(q, k, v):
        qkv = torch.stack((q, k, v), dim=2)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    run_case(NAMED_LAYOUTS["window_sink"], torch.float16, make_qkv=packed)

    def head_dim_strided(q, k, v):  # stride(-1) != 1: copied once by the launcher
        return tuple(torch.stack((t, t), -1)[..., 0] for t in (q, k, v))
    run_case(NAMED_LAYOUTS["block_causal"], torch.float32, make_qkv=head_dim_strided)


def test_empty_rows_give_zero_output_and_gradient():
    layout = NAMED_LAYOUTS["empty_rows"]
    q = torch.randn(1, layout.num_queries, 2, 32, device=DEVICE, requires_grad=True)
    k = torch.randn(1, layout.num_keys, 2, 32, device=DEVICE, requires_grad=True)
    v = torch.randn(1, layout.num_keys, 2, 32, device=DEVICE, requires_grad=True)
    out = launch().triton_attention(q, k, v, layout)
    out.square().sum().backward()
    empty = ~layout.token_mask().any(1)
    assert empty.any() and (~empty).any()
    assert (out[:, empty.to(DEVICE)] == 0).all()
    assert (q.grad[:, empty.to(DEVICE)] == 0).all()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


def brute_force_tiles(layout, block_m, block_n):
    mask = layout.token_mask()
    tiles = mask.split(block_m, 0)
    return torch.tensor([[bool(t.any()) for t in row.split(block_n, 1)] for row in tiles]), \
        torch.tensor([[bool(t.all()) for t in row.split(block_n, 1)] for row in tiles])


@pytest.mark.parametrize("case", range(8))
def test_tile_runs_match_token_mask(case):
    rng = random.Random(case)
    layout = random_layout(rng)
    block_m, block_n = rng.choice([8, 16, 32]), rng.choice([8, 16, 64])
    any_want, all_want = brute_force_tiles(layout, block_m, block_n)
    any_got, all_got = layout.tile_visibility(block_m, block_n)
    assert torch.equal(any_got, any_want) and torch.equal(all_got, all_want)
    for by, visible in (("query", any_want), ("key", any_want.T)):
        table = layout.tile_runs(block_m, block_n, by)
        assert sorted(table.order.tolist()) == list(range(visible.shape[0]))
        work = visible.sum(1)
        assert (work[table.order.long()].diff() <= 0).all()  # heaviest rows first
        for row in range(visible.shape[0]):
            tiles = table.tiles(row)
            assert sorted(tiles) == visible[row].nonzero().flatten().tolist()
            runs = table.runs[table.start[row]:table.start[row + 1]].tolist()
            assert all(lo < hi for lo, hi in runs)
            for t in tiles[:table.num_full_tiles(row)]:  # the unmasked loop: every pair visible
                m, n = (row, t) if by == "query" else (t, row)
                block = layout.token_mask()[m * block_m:(m + 1) * block_m,
                                            n * block_n:(n + 1) * block_n]
                assert block.all() and block.shape == (block_m, block_n)
            # maximal runs: two runs of the same kind never touch
            full, part = runs[:table.num_full[row]], runs[table.num_full[row]:]
            for group in (full, part):
                assert all(a[1] < b[0] for a, b in zip(group, group[1:]))


def test_block_causal_skips_masked_tiles():
    """Wan's training shape: 21 frames x 1560 tokens, chunk 3 -> ~57% of tiles visited, in
    at most 2 runs per query tile (the full prefix, the partial tile at a chunk boundary)."""
    layout = AttentionLayout.block_causal(21, 1560, chunk_frames=3)
    table = layout.tile_runs(128, 64)
    total = layout.tile_visibility(128, 64)[0].numel()
    assert 0.5 < table.num_visits / total < 0.65
    full = sum(table.num_full_tiles(r) for r in range(table.start.numel() - 1))
    assert full > 0.9 * table.num_visits  # most tiles skip the mask
    assert (table.start.diff() <= 2).all()
    # window + sink: sink run, its boundary tile, the window (partial start, full, partial end)
    sink = AttentionLayout.block_causal(21, 1560, 3, window_frames=12, sink_frames=3)
    assert (sink.tile_runs(128, 64).start.diff() <= 5).all()


# Layouts whose rows hold several runs of each kind at 16-token tiles: a sink run and a
# window run with a gap between them; cache slots scattered with empty ones between;
# teacher forcing's clean and noisy runs.
RUN_LAYOUTS = {
    "sink_gap": AttentionLayout.block_causal(12, 8, chunk_frames=2, window_frames=4,
                                             sink_frames=2),
    "scattered_slots": AttentionLayout.cached([10, 11], [0, -1, 6, -1, 8, 9, -1, 7, 10, 11], 16,
                                              chunk_frames=2, window_frames=6, sink_frames=1),
    "teacher_runs": AttentionLayout.teacher_forcing(6, 8, chunk_frames=2, window_frames=4,
                                                    sink_frames=1),
}


@pytest.mark.parametrize("name", list(RUN_LAYOUTS))
def test_multi_run_layouts(name):
    layout = RUN_LAYOUTS[name]
    table = layout.tile_runs(16, 16)
    assert (table.start.diff() >= 2).any()  # the case this test is for: several runs per row
    sizes = launch().TileSizes(16, 16, 16, 16, 16, 16)
    run_case(layout, torch.bfloat16 if name == "sink_gap" else torch.float32, batch=1,
             sizes=sizes, seed=7)


@pytest.mark.parametrize("name,dtype", [("window_sink", torch.bfloat16),
                                        ("teacher_window_sink", torch.float32),
                                        ("cached_dense", torch.float16)], ids=str)
def test_fused_dq(name, dtype, monkeypatch):
    """dQ accumulated by the dK/dV kernel (atomics) instead of its own kernel."""
    monkeypatch.setenv(launch().FUSED_DQ_ENV, "1")
    run_case(NAMED_LAYOUTS[name], dtype, batch=1, seed=3)


def test_fused_dq_multi_runs(monkeypatch):
    monkeypatch.setenv(launch().FUSED_DQ_ENV, "1")
    run_case(RUN_LAYOUTS["scattered_slots"], torch.float32, batch=1,
             sizes=launch().TileSizes(16, 16, 16, 16, 16, 16), seed=4)


def test_dense_run_through_dispatch_equals_reference():
    """A dense layout whose length is not a tile multiple: one full run + one cut tile."""
    run_case(AttentionLayout.cached([2, 3], [0, 1, 2, 3], 13, chunk_frames=2), torch.float16,
             batch=1)


# ---------------------------------------------------------------------------- GPU only
needs_compiled_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs CUDA and compiled (not interpreted) Triton")


@pytest.mark.gpu
@needs_compiled_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_wan_shapes(dtype):
    """Tokens per frame not a multiple of any tile (1560 as in Wan, shrunk to 156 frames of
    3 chunks), window and sink, plus the dense streaming case."""
    run_case(AttentionLayout.block_causal(9, 156, 3, window_frames=6, sink_frames=1), dtype,
             heads=4, head_dim=128)
    run_case(AttentionLayout.cached([9, 10, 11], list(range(12)), 156, 3), dtype,
             heads=4, head_dim=128)


@pytest.mark.gpu
@needs_compiled_gpu
def test_gpu_fused_dq(monkeypatch):
    monkeypatch.setenv(launch().FUSED_DQ_ENV, "1")
    run_case(AttentionLayout.block_causal(9, 156, 3, window_frames=6, sink_frames=1),
             torch.bfloat16, heads=4, head_dim=128)


@pytest.mark.gpu
@needs_compiled_gpu
def test_gpu_autotuned_configs(monkeypatch, tmp_path):
    """With tuning on, every candidate runs once and the result stays exact."""
    monkeypatch.setenv(launch().AUTOTUNE_ENV, "1")
    monkeypatch.setenv(launch().TUNING_FILE_ENV, str(tmp_path / "tuning.json"))
    run_case(AttentionLayout.block_causal(6, 156, 3), torch.bfloat16, heads=2, head_dim=128)
    assert (tmp_path / "tuning.json").exists()


@pytest.mark.gpu
@needs_compiled_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_second_device():
    """Tensors on cuda:1 while cuda:0 is current: the launches follow the tensors."""
    assert torch.cuda.current_device() == 0
    run_case(AttentionLayout.block_causal(6, 156, 3, window_frames=3), torch.bfloat16,
             heads=2, head_dim=64, device=torch.device("cuda", 1))


SYNCS = ("aten::_local_scalar_dense", "aten::is_nonzero", "aten::item")   # what a host read of a tensor runs


@pytest.mark.parametrize("name", ["empty_rows", "block_causal"])
def test_the_reference_reads_nothing_back_per_call_and_zeroes_empty_rows(name):
    """Which query rows see no key comes from the layout's host-side frame mask (memoised), not
    from a read of a device tensor in every attention call (a synchronisation on a GPU)."""
    layout = NAMED_LAYOUTS[name]
    q = torch.randn(1, layout.num_queries, 2, 32)
    k, v = (torch.randn(1, layout.num_keys, 2, 32) for _ in range(2))
    first = attention_reference(q, k, v, layout)                 # builds the masks once
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        again = attention_reference(q, k, v, layout)
    assert not [e.name for e in prof.events() if e.name in SYNCS]
    assert torch.equal(first, again)
    empty = ~layout.token_mask().any(1)
    assert (again[:, empty] == 0).all() and torch.isfinite(again).all()
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2).double() for t in (q, k, v)), attn_mask=layout.token_mask()).transpose(1, 2)
    keep = ~empty
    assert torch.allclose(again[:, keep].double(), expected[:, keep], atol=1e-5)
