"""The torch path's grouped attention (one unmasked SDPA per query group) against float64
references written here: the visibility rule restated from `kernels/layout.py`'s docstring,
a dense masked softmax, and exact enumeration of every query's visible keys."""

import math

import pytest
import torch

from forcelab.kernels import AttentionLayout, attention
from forcelab.kernels import grouped
from forcelab.kernels.grouped import attention_grouped, query_groups, use_groups

DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
# Against float64 on the same (rounded) inputs: SDPA accumulates in fp32; bf16 outputs and
# gradients are rounded once more.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}
SYNCS = ("aten::_local_scalar_dense", "aten::is_nonzero", "aten::item")  # a host read


def L(q_frames, k_frames, *args, **kwargs):
    return AttentionLayout(torch.tensor(q_frames), torch.tensor(k_frames), *args, **kwargs)


# Every rule branch: chunks of 1 and more, window, sink, an offset start, one token per frame,
# teacher forcing with window and sink, cache slots in any order with empty (-1) ones, query
# rows that see nothing.
LAYOUTS = {
    "full": AttentionLayout.full(3, 7),
    "frame_causal": AttentionLayout.block_causal(5, 4, chunk_frames=1),
    "block_causal": AttentionLayout.block_causal(6, 5, chunk_frames=3),
    "window": AttentionLayout.block_causal(8, 3, chunk_frames=2, window_frames=4),
    "window_sink": AttentionLayout.block_causal(8, 3, chunk_frames=2, window_frames=4,
                                                sink_frames=1),
    "window_offset": AttentionLayout.block_causal(7, 3, chunk_frames=2, window_frames=3,
                                                  sink_frames=2, start_frame=3),
    "one_token_frames": AttentionLayout.block_causal(12, 1, chunk_frames=3, window_frames=6,
                                                     sink_frames=1),
    "teacher_forcing": AttentionLayout.teacher_forcing(6, 3, chunk_frames=2),
    "teacher_window_sink": AttentionLayout.teacher_forcing(6, 3, chunk_frames=2,
                                                           window_frames=4, sink_frames=1),
    "cached_empty_slots": AttentionLayout.cached([6, 7], [0, -1, 4, 5, -1, 6, 7], 3,
                                                 chunk_frames=2, window_frames=4, sink_frames=1),
    "cached_shuffled": AttentionLayout.cached([8, 9], [4, -1, 0, 7, 6, 5, 8, 9], 2,
                                              chunk_frames=2, window_frames=6),
    "cached_dense": AttentionLayout.cached([4, 5], [0, 1, 2, 3, 4, 5], 3, chunk_frames=2),
    # queries of chunk 1 see frames 0..3; queries of chunk 3 see nothing (window 4, no sink)
    "empty_rows": L([2, 3, 6, 7], [-1, 0, 1, 2, 3], 2, chunk_frames=2, window_frames=4),
}


def rule(layout, qi, ki) -> bool:
    """Whether key frame ki is visible to query frame qi, by the rule as the layout's docstring
    states it (written independently of `frame_mask`)."""
    qf, kf = int(layout.q_frames[qi]), int(layout.k_frames[ki])
    if kf < 0:
        return False
    c = layout.chunk_frames
    if c is None:
        return True
    qc, kc = qf // c, kf // c
    k_noisy = layout.k_noisy is not None and bool(layout.k_noisy[ki])
    if layout.q_noisy is None:
        causal = kc <= qc
    elif k_noisy:
        causal = bool(layout.q_noisy[qi]) and kc == qc
    elif layout.q_noisy[qi]:
        causal = kc < qc
    else:
        causal = kc <= qc
    if not causal:
        return False
    if layout.window_frames is None or kf >= (qc + 1) * c - layout.window_frames:
        return True
    return kf < layout.sink_frames and not k_noisy


def token_rule_mask(layout) -> torch.Tensor:
    """[Lq, Lk] bool from `rule`, frame by frame."""
    frames = torch.tensor([[rule(layout, qi, ki) for ki in range(len(layout.k_frames))]
                           for qi in range(len(layout.q_frames))], dtype=torch.bool)
    s = layout.tokens_per_frame
    return frames.reshape(len(layout.q_frames), 1, -1, 1).expand(-1, s, -1, s).reshape(
        layout.num_queries, layout.num_keys)


def dense_reference(q, k, v, mask):
    """float64 masked softmax attention, [B, L, H, D]; a row with no visible key gives 0."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    seen = mask.any(1)[None, None, :, None]
    weights = torch.where(seen, scores, 0.0).softmax(-1) * mask
    return torch.einsum("bhqk,bkhd->bqhd", weights, v)


def enumerated_reference(q, k, v, layout):
    """float64, one query token at a time over the key tokens `rule` lets it see."""
    s, scale = layout.tokens_per_frame, 1 / math.sqrt(q.shape[-1])
    rows = []
    for i in range(layout.num_queries):
        keys = [j for j in range(layout.num_keys) if rule(layout, i // s, j // s)]
        if not keys:
            rows.append(torch.zeros_like(q[:, i].double()))
            continue
        kk, vv = k[:, keys].double(), v[:, keys].double()              # [B, n, H, D]
        weights = (torch.einsum("bhd,bnhd->bhn", q[:, i].double(), kk) * scale).softmax(-1)
        rows.append(torch.einsum("bhn,bnhd->bhd", weights, vv))
    return torch.stack(rows, 1)


def inputs(layout, dtype, device, batch=2, heads=3, head_dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, layout.num_queries, heads, head_dim, generator=gen)
    k, v = (torch.randn(batch, layout.num_keys, heads, head_dim, generator=gen)
            for _ in range(2))
    d_out = torch.randn(q.shape, generator=gen)
    return [t.to(dtype).to(device) for t in (q, k, v, d_out)]


def forward_backward(fn, q, k, v, d_out):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    return [out, *torch.autograd.grad(out, leaves, d_out.to(out.dtype))]


def assert_matches(got, want, tol, what):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), f"{what} {name} has NaN/inf"
        torch.testing.assert_close(g.double().cpu(), w.double().cpu(), atol=tol, rtol=tol,
                                   msg=lambda m, name=name: f"{what} {name}: {m}")


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_grouped_matches_dense_float64(name, dtype, device):
    layout = LAYOUTS[name]
    q, k, v, d_out = inputs(layout, dtype, device, seed=len(name))
    got = forward_backward(lambda *x: attention_grouped(*x, layout), q, k, v, d_out)
    mask = token_rule_mask(layout).to(device)
    want = forward_backward(lambda *x: dense_reference(*x, mask), q, k, v, d_out.double())
    assert all(g.dtype == dtype for g in got)
    assert_matches(got, want, TOLERANCE[dtype], f"{name} {dtype}")


@pytest.mark.parametrize("name", ["window_offset", "teacher_window_sink", "cached_shuffled",
                                  "empty_rows"])
def test_grouped_matches_enumeration(name):
    layout = LAYOUTS[name]
    q, k, v, d_out = inputs(layout, torch.float64, "cpu", batch=2, heads=2, head_dim=4)
    got = forward_backward(lambda *x: attention_grouped(*x, layout), q, k, v, d_out)
    want = forward_backward(lambda *x: enumerated_reference(*x, layout), q, k, v, d_out)
    assert_matches(got, want, TOLERANCE[torch.float64], name)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_groups_are_visible_rectangles_covering_the_rule(name):
    """Query groups tile the queries in order; each sees exactly its key runs, and every pair
    inside (group queries x its keys) is visible: no group needs a mask."""
    layout = LAYOUTS[name]
    mask = token_rule_mask(layout)
    groups = query_groups(layout)
    assert groups[0].queries[0] == 0 and groups[-1].queries[1] == layout.num_queries
    assert all(a.queries[1] == b.queries[0] for a, b in zip(groups, groups[1:]))
    for group in groups:
        want = torch.zeros(layout.num_keys, dtype=torch.bool)
        for start, end in group.keys:
            want[start:end] = True
        assert all(a[1] < b[0] for a, b in zip(group.keys, group.keys[1:]))  # maximal runs
        rows = mask[group.queries[0]:group.queries[1]]
        assert (rows == want).all(), (group, rows.int())


def test_group_counts_follow_the_chunks():
    """Block-causal: one group per chunk (a key prefix); teacher forcing: clean and noisy chunk
    apart; a streaming chunk against its cache: one group."""
    bc = query_groups(AttentionLayout.block_causal(21, 4, chunk_frames=3))
    assert len(bc) == 7 and all(g.keys == ((0, g.queries[1]),) for g in bc)
    assert len(query_groups(AttentionLayout.teacher_forcing(8, 4, chunk_frames=2))) == 8
    assert len(query_groups(LAYOUTS["cached_empty_slots"])) == 1


def test_one_key_run_is_a_view_of_k():
    layout = AttentionLayout.block_causal(4, 2, chunk_frames=2)
    k = torch.randn(1, 1, layout.num_keys, 4)
    run = query_groups(layout)[0].keys
    assert grouped._visible(k, run).data_ptr() == k.data_ptr()


def test_packed_and_strided_inputs():
    """q, k, v as views of one packed [B, L, 3, H, D] projection (the DiT's fused qkv)."""
    layout = LAYOUTS["teacher_window_sink"]
    q, k, v, d_out = inputs(layout, torch.float32, "cpu", seed=5)
    packed = torch.stack((q, k, v), dim=2)
    got = attention_grouped(packed[:, :, 0], packed[:, :, 1], packed[:, :, 2], layout)
    want = dense_reference(q, k, v, token_rule_mask(layout))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_rows_without_keys_give_exact_zeros():
    layout = LAYOUTS["empty_rows"]
    q, k, v, d_out = inputs(layout, torch.float32, "cpu")
    out, dq, dk, dv = forward_backward(lambda *x: attention_grouped(*x, layout), q, k, v, d_out)
    empty = ~token_rule_mask(layout).any(1)
    assert empty.any() and (~empty).any()
    assert (out[:, empty] == 0).all() and (dq[:, empty] == 0).all()
    assert torch.isfinite(out).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()


def test_no_visible_key_at_all():
    """Every query sees nothing: zeros; the automatic choice keeps the masked call, whose zero
    gradients reach q, k and v."""
    layout = L([2, 3], [-1, -1], 2, chunk_frames=2)
    q, k, v, d_out = inputs(layout, torch.float32, "cpu")
    assert (attention_grouped(q, k, v, layout) == 0).all()
    assert not use_groups(layout, q)
    got = forward_backward(lambda *x: attention(*x, layout, backend="torch"), q, k, v, d_out)
    assert all((g == 0).all() for g in got)


def test_the_rule_picks_groups_where_they_pay():
    """One group with one key run always; tiny layouts, many small groups and small copied
    gains keep the dense mask; teacher forcing at the toy DiT's head layout (16 tokens per
    frame, chunks of 2, batch 16, 3 heads of 32) and Wan's block-causal training take groups."""
    def q_of(layout, batch, heads, head_dim):
        return torch.empty(1, 1, 1, 1).expand(batch, layout.num_queries, heads, head_dim)
    one_run = L([4, 5], [-1, 1, 2, 3, 4, 5], 3, chunk_frames=2)    # a slice: nothing extra
    assert len(query_groups(one_run)) == 1 and use_groups(one_run, q_of(one_run, 1, 1, 8))
    three_runs = LAYOUTS["cached_empty_slots"]                    # copies for 2 skipped keys
    assert len(query_groups(three_runs)[0].keys) == 3
    assert not use_groups(three_runs, q_of(three_runs, 1, 1, 8))
    tiny = LAYOUTS["teacher_window_sink"]
    assert not use_groups(tiny, q_of(tiny, 2, 3, 8))
    frame_causal = AttentionLayout.block_causal(12, 16, chunk_frames=1)  # 16-token groups
    assert not use_groups(frame_causal, q_of(frame_causal, 16, 12, 128))
    toy = AttentionLayout.teacher_forcing(8, 16, chunk_frames=2)
    assert use_groups(toy, q_of(toy, 16, 3, 32)) and not use_groups(toy, q_of(toy, 1, 3, 32))
    wan = AttentionLayout.block_causal(21, 1560, chunk_frames=3)
    assert use_groups(wan, q_of(wan, 1, 12, 128))
    cpu_only = AttentionLayout.block_causal(21, 16, chunk_frames=3)     # GPU calls cost more
    assert use_groups(cpu_only, q_of(cpu_only, 16, 3, 32))
    other_device = torch.empty(16, cpu_only.num_queries, 3, 32, device="meta")  # the GPU's
    assert not use_groups(cpu_only, other_device)


def test_dispatch_torch_backend_is_exact_on_both_branches():
    cases = [(AttentionLayout.teacher_forcing(4, 16, chunk_frames=2), 8),  # groups
             (LAYOUTS["teacher_window_sink"], 1)]                  # dense mask
    for (layout, batch), expect_groups in zip(cases, (True, False)):
        q, k, v, d_out = inputs(layout, torch.float32, "cpu", batch=batch, head_dim=32)
        assert use_groups(layout, q) == expect_groups
        got = forward_backward(lambda *x: attention(*x, layout, backend="torch"), q, k, v,
                               d_out)
        mask = token_rule_mask(layout)
        want = forward_backward(lambda *x: dense_reference(*x, mask), q, k, v, d_out.double())
        assert_matches(got, want, TOLERANCE[torch.float32], f"groups={expect_groups}")


def test_grouped_never_builds_the_token_mask(monkeypatch):
    def no_token_mask(self, device=None):
        raise AssertionError("the [Lq, Lk] token mask was built")
    monkeypatch.setattr(AttentionLayout, "token_mask", no_token_mask)
    for name in ("window_sink", "teacher_window_sink", "cached_empty_slots", "empty_rows"):
        layout = AttentionLayout(**{f: getattr(LAYOUTS[name], f) for f in (
            "q_frames", "k_frames", "tokens_per_frame", "chunk_frames", "window_frames",
            "sink_frames", "q_noisy", "k_noisy")})                  # a fresh memo
        q, k, v, d_out = inputs(layout, torch.float32, "cpu")
        forward_backward(lambda *x: attention_grouped(*x, layout), q, k, v, d_out)
        memo = layout.__dict__.get("_memo_masks", {})
        assert not [key for key in memo if isinstance(key, tuple) and key[0] == "tokens"]


@pytest.mark.parametrize("name", ["window_sink", "empty_rows", "cached_empty_slots"])
def test_no_host_read_per_call_after_the_plan(name):
    """The plan comes from the host-side frame mask once per layout; later calls (forward,
    backward, the automatic choice) read nothing back from a tensor (a sync on a GPU)."""
    layout = LAYOUTS[name]
    q, k, v, d_out = inputs(layout, torch.float32, "cpu", head_dim=32)
    forward_backward(lambda *x: attention(*x, layout, backend="torch"), q, k, v, d_out)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        use_groups(layout, q)
        forward_backward(lambda *x: attention(*x, layout, backend="torch"), q, k, v, d_out)
        forward_backward(lambda *x: attention_grouped(*x, layout), q, k, v, d_out)
    assert not [e.name for e in prof.events() if e.name in SYNCS]
