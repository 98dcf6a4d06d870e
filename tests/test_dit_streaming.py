"""Streaming with the KV cache equals one block-causal forward over the whole sequence."""

import pytest
import torch

from forcelab.models import CausalDiT, DiTConfig

C = DiTConfig.preset("toy").in_channels


def toy_model(layers=2, seed=0):
    torch.manual_seed(seed)
    return CausalDiT(DiTConfig.preset("toy", num_layers=layers)).eval()


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("chunk,window,sink,frames", [
    (2, None, 0, 8),
    (1, None, 0, 5),
    (2, 4, 0, 10),
    (2, 6, 2, 12),
    (3, 6, 1, 12),
])
def test_stream_equals_full_block_causal(chunk, window, sink, frames):
    model = toy_model()
    g = torch.Generator().manual_seed(3)
    B, H, W = 2, 8, 6
    x = torch.randn(B, C, frames, H, W, generator=g)
    t = torch.rand(B, frames, generator=g) * 1000
    ctx = torch.randn(B, 9, 32, generator=g)
    with torch.no_grad():
        full = model(x, t, ctx, chunk_frames=chunk, window_frames=window, sink_frames=sink)
        cache = model.new_cache(B, H, W, chunk_frames=chunk, window_frames=window, sink_frames=sink,
                                max_frames=frames)
        model.set_prompt(cache, ctx)
        for s in range(0, frames, chunk):
            sl = slice(s, s + chunk)
            before = list(cache.slot_frame)
            read = model(x[:, :, sl], t[:, sl], cache=cache)
            assert cache.slot_frame == before and cache.end_frame == s  # reading changes nothing
            wrote = model(x[:, :, sl], t[:, sl], cache=cache, commit=True)
            assert cache.end_frame == s + chunk
            assert max_rel(read, full[:, :, sl]) <= 1e-5
            assert max_rel(wrote, full[:, :, sl]) <= 1e-5


def test_multi_chunk_query_window_equals_full():
    """Rolling-Forcing style pass: several chunks as one query against the cache."""
    model = toy_model()
    B, H, W, chunk, frames = 1, 4, 4, 2, 10
    x = torch.randn(B, C, frames, H, W)
    t = torch.rand(B, frames) * 1000
    ctx = torch.randn(B, 16, 32)
    with torch.no_grad():
        full = model(x, t, ctx, chunk_frames=chunk, window_frames=6, sink_frames=2)
        cache = model.new_cache(B, H, W, chunk_frames=chunk, window_frames=6, sink_frames=2)
        model.set_prompt(cache, ctx)
        model(x[:, :, :4], t[:, :4], cache=cache, commit=True)
        # frames 4..9 at once: chunk (4,5) sees the cache; (6,7) also sees (4,5), etc.
        got = model(x[:, :, 4:], t[:, 4:], cache=cache)
    assert max_rel(got[:, :, :2], full[:, :, 4:6]) <= 1e-5


def test_long_stream_constant_memory_past_rope_table():
    model = toy_model(layers=1)
    cfg = model.config
    B, H, W, chunk = 1, 4, 4, 2
    frames = 1100
    assert frames > cfg.rope_max_len
    cache = model.new_cache(B, H, W, chunk_frames=chunk, window_frames=6, sink_frames=2)
    model.set_prompt(cache, torch.randn(B, 4, 32))
    ptrs = [t.data_ptr() for t in cache.k + cache.v]
    nbytes = None
    x = torch.randn(B, C, chunk, H, W)
    with torch.no_grad():
        for s in range(0, frames, chunk):
            out = model(x, torch.full((B,), 0.0), cache=cache, commit=True)
            assert torch.isfinite(out).all()
            if s == 20:
                nbytes = cache.nbytes
            if s > 20:
                assert cache.nbytes == nbytes
    assert [t.data_ptr() for t in cache.k + cache.v] == ptrs  # never reallocated
    assert cache.end_frame == frames
    assert cache.stored_frames == [0, 1, frames - 4, frames - 3, frames - 2, frames - 1]


def test_window_stream_is_shift_invariant():
    """Window-relative RoPE: the same content far into a stream gives the same output
    as at its start (true-distance policy without a sink), up to float error."""
    model = toy_model(layers=1)
    B, H, W, chunk = 1, 4, 4, 2
    x = torch.randn(B, C, 4, H, W)
    ctx = torch.randn(B, 4, 32)
    outs = []
    with torch.no_grad():
        for offset in (0, 2000):
            cache = model.new_cache(B, H, W, chunk_frames=chunk, window_frames=4, sink_frames=0)
            model.set_prompt(cache, ctx)
            model(x[:, :, :2], torch.zeros(B), cache=cache, start_frame=offset, commit=True)
            outs.append(model(x[:, :, 2:], torch.full((B,), 500.0), cache=cache))
    assert max_rel(outs[1], outs[0]) <= 1e-5


def test_prompt_switch_recache_changes_output():
    model = toy_model()
    B, H, W, chunk = 1, 4, 4, 2
    x = torch.randn(B, C, 6, H, W)
    ctx_a, ctx_b = torch.randn(B, 8, 32), torch.randn(B, 8, 32)
    zero = torch.zeros(B)
    with torch.no_grad():
        cache = model.new_cache(B, H, W, chunk_frames=chunk, window_frames=6, sink_frames=2)
        model.set_prompt(cache, ctx_a)
        model(x[:, :, :4], zero, cache=cache, commit=True)
        before = model(x[:, :, 4:], zero, cache=cache)
        model.set_prompt(cache, ctx_b)          # new cross-attention prompt ...
        only_prompt = model(x[:, :, 4:], zero, cache=cache)
        cache.reset(keep_sink=True)             # ... and rebuild the self-attention cache with it
        assert cache.stored_frames == [0, 1]
        model(x[:, :, 2:4], zero, cache=cache, start_frame=2, commit=True)
        after = model(x[:, :, 4:], zero, cache=cache)
        # reference built in another order: sink under prompt a, then frames 2..3 under prompt b
        fresh = model.new_cache(B, H, W, chunk_frames=chunk, window_frames=6, sink_frames=2)
        model.set_prompt(fresh, ctx_a)
        model(x[:, :, :2], zero, cache=fresh, commit=True)
        model.set_prompt(fresh, ctx_b)
        model(x[:, :, 2:4], zero, cache=fresh, commit=True)
        expect = model(x[:, :, 4:], zero, cache=fresh)
    # differences far above the 1e-6 of equal computations (a random toy DiT's outputs move little)
    assert max_rel(before, only_prompt) > 1e-4
    assert max_rel(only_prompt, after) > 1e-4      # the recached self-attention K/V matter
    assert max_rel(after, expect) <= 1e-6


def test_flush_keeps_sink_and_last_frame():
    model = toy_model(layers=1)
    cache = model.new_cache(1, 4, 4, chunk_frames=2, window_frames=8, sink_frames=2)
    model.set_prompt(cache, torch.randn(1, 4, 32))
    with torch.no_grad():
        model(torch.randn(1, C, 8, 4, 4), torch.zeros(1), cache=cache, commit=True)
    cache.flush(keep_last=1)
    assert cache.stored_frames == [0, 1, 7]


def test_adjacent_sink_sits_just_before_the_window():
    """sink_rope="adjacent": far into a stream, the sink frame is rotated as if it were the
    frame right before the window - the same as a short stream where it really is.
    One layer: cached K/V then depend only on each frame's own input, not on what it saw."""
    model = toy_model(layers=1)
    B, H, W = 1, 4, 4
    g = torch.Generator().manual_seed(5)
    sink, b1, b2, q = (torch.randn(B, C, 1, H, W, generator=g) for _ in range(4))
    ctx = torch.randn(B, 6, 32, generator=g)
    zero, mid = torch.zeros(B), torch.full((B,), 400.0)
    with torch.no_grad():
        far = model.new_cache(B, H, W, chunk_frames=1, window_frames=3, sink_frames=1, sink_rope="adjacent")
        model.set_prompt(far, ctx)
        model(sink, zero, cache=far, start_frame=0, commit=True)
        for f in range(1, 10):  # filler frames, evicted by the window
            model(torch.randn(B, C, 1, H, W, generator=g), zero, cache=far, start_frame=f, commit=True)
        model(b1, zero, cache=far, start_frame=10, commit=True)
        model(b2, zero, cache=far, start_frame=11, commit=True)
        assert far.stored_frames == [0, 10, 11]
        got = model(q, mid, cache=far, start_frame=12)

        near = model.new_cache(B, H, W, chunk_frames=1, window_frames=None, max_frames=4)
        model.set_prompt(near, ctx)
        for f, x in enumerate((sink, b1, b2)):
            model(x, zero, cache=near, start_frame=f, commit=True)
        expect = model(q, mid, cache=near, start_frame=3)

        true_dist = model.new_cache(B, H, W, chunk_frames=1, window_frames=3, sink_frames=1)
        model.set_prompt(true_dist, ctx)
        for f, x in [(0, sink), (10, b1), (11, b2)]:
            model(x, zero, cache=true_dist, start_frame=f, commit=True)
        other = model(q, mid, cache=true_dist, start_frame=12)
    assert max_rel(got, expect) <= 1e-5
    assert max_rel(other, expect) > 1e-4  # the policy matters


def test_rope_tables_join_axes_exactly():
    """The temporal part joined on the device to the memoised row/column part equals the
    table of the concatenated float64 angles (cos of a concatenation = concatenation of cos)."""
    from forcelab.models.rope import _inv_freq, rope_tables
    cfg = DiTConfig.preset("toy")
    positions, h, w = [5, 6, 1000], 3, 4
    cos, sin = rope_tables(cfg, positions, h, w)
    dt, dh, dw = cfg.rope_axis_dims
    theta = float(cfg.rope_theta)
    rows = []
    for p in positions:
        for i in range(h):
            for j in range(w):
                rows.append(torch.cat([p * _inv_freq(dt, theta), i * _inv_freq(dh, theta),
                                       j * _inv_freq(dw, theta)]))
    ang = torch.stack(rows)
    assert torch.equal(cos, ang.cos().float()) and torch.equal(sin, ang.sin().float())


def test_read_pass_attends_to_views_of_the_store():
    """No gradient: a pass's keys/values are copied after the used slots and attention reads
    one view of the cache (no concatenation); with gradients it concatenates and the store
    stays out of the graph."""
    model = toy_model(layers=1)
    cache = model.new_cache(1, 4, 4, chunk_frames=2, window_frames=4, sink_frames=0)
    model.set_prompt(cache, torch.randn(1, 4, 32))
    with torch.no_grad():
        model(torch.randn(1, model.config.in_channels, 2, 4, 4), torch.zeros(1), cache=cache, commit=True)
    S = cache.tokens_per_frame
    k_new, v_new = torch.randn(2, 1, 2 * S, model.config.num_heads, model.config.head_dim).unbind(0)
    k, v = cache.attention_kv(0, 2 * S, k_new, v_new)
    assert k.data_ptr() == cache.k[0].data_ptr() and v.data_ptr() == cache.v[0].data_ptr()
    assert torch.equal(k[:, 2 * S:], k_new) and torch.equal(v[:, 2 * S:], v_new)
    assert cache.stored_frames == [0, 1]                     # reading changed nothing stored
    k_grad = k_new.clone().requires_grad_()
    k, v = cache.attention_kv(0, 2 * S, k_grad, v_new)
    assert k.data_ptr() != cache.k[0].data_ptr() and k.requires_grad
    assert torch.equal(k[:, :2 * S], cache.k[0][:, :2 * S]) and not cache.k[0].requires_grad


def test_adjacent_sink_is_rotated_from_its_pre_rope_keys():
    """The moving sink is rotated afresh from the keys before RoPE at every pass: after many
    passes its keys are exactly one rotation of the stored pre-RoPE keys (no drift)."""
    from forcelab.kernels import apply_rope
    from forcelab.models.rope import rope_tables
    model = toy_model(layers=1)
    cfg = model.config
    B, H, W, chunk = 1, 4, 4, 1
    cache = model.new_cache(B, H, W, chunk_frames=chunk, window_frames=3, sink_frames=1,
                            sink_rope="adjacent", dtype=torch.bfloat16)
    model.set_dtype(torch.bfloat16)
    model.set_prompt(cache, torch.randn(B, 4, 32))
    with torch.no_grad():
        for f in range(12):
            model(torch.randn(B, cfg.in_channels, 1, H, W), torch.zeros(B), cache=cache, start_frame=f, commit=True)
    S = cache.tokens_per_frame
    assert cache.stored_frames == [0, 10, 11]
    q_pos = [12]
    sink_pos = cache.key_positions(q_pos)[:1]
    assert sink_pos == [9]                                   # just before frame 10
    cos, sin = rope_tables(cfg, sink_pos, H // 2, W // 2)
    k_new = torch.zeros(B, S, cfg.num_heads, cfg.head_dim, dtype=torch.bfloat16)
    k, _ = cache.attention_kv(0, cache.used_slots * S, k_new, k_new, (cos, sin))
    assert torch.equal(k[:, :S], apply_rope(cache.sink_k[0], cos, sin))
