"""Cache policies (models/cache_policy.py) against plain re-implementations in float64.

- every policy equals sink + window while its budget is never exceeded (bit for bit, the DiT);
- temporal_merge / similar_merge: which slots merge follows a plain list simulation of the rule,
  every slot holds the mean of its frames' K/V, and a pass's attention output is plain softmax
  attention over those merged keys (float64 here);
- deep_forcing: the attention mass is the float64 softmax mass per key frame, observing it
  leaves the output alone, and the evicted frame is the least attended one outside the recent;
- dummy_heads: the short heads are the most local ones (float64 mass), they attend the sink,
  the newest `short` frames and themselves, the other heads everything;
- specs: one clear error for a bad name or option."""

import math

import pytest
import torch

from forcelab.errors import ForcelabError
from forcelab.kernels import AttentionLayout
from forcelab.models import CausalDiT, DiTConfig
from forcelab.models.cache_policy import POLICIES, attention_mass, make_policy
from forcelab.models.kv_cache import EMPTY, KVCache
from forcelab.models.plans import Chunkwise, Rolling
from forcelab.models.rollout import Noise, rollout

B, L, H, D, S = 2, 2, 4, 8, 3          # batch, layers, heads, head dim, tokens per frame
CHUNK, WINDOW, SINK = 1, 6, 1          # ring of WINDOW - CHUNK = 5 frames
FRAMES = 14


def make_cache(policy, window=WINDOW, sink=SINK, chunk=CHUNK):
    return KVCache(num_layers=L, batch_size=B, tokens_per_frame=S, num_heads=H, head_dim=D, chunk_frames=chunk,
                   window_frames=window, sink_frames=sink, max_frames=None, sink_rope="true_distance",
                   dtype=torch.float32, cache_policy=policy)


def frame_kv(frames, seed=0):
    """Random keys/values [L][frames] of [B, S, H, D], float64 originals."""
    gen = torch.Generator().manual_seed(seed)
    return [[(torch.randn(B, S, H, D, generator=gen, dtype=torch.float64),
              torch.randn(B, S, H, D, generator=gen, dtype=torch.float64)) for _ in range(frames)] for _ in range(L)]


def commit(cache, kv, f):
    for layer in range(L):
        k, v = kv[layer][f]
        pre = k.float() if cache.needs_pre_rope(f) else None      # a moving sink keeps its keys before RoPE
        cache.write(layer, f, k.float(), v.float(), pre)


def ring_spans(cache):
    """{slot: frames it holds}: read from the cache's bookkeeping (newest frame, count)."""
    return {s: list(range(cache.slot_frame[s] - cache.slot_count[s] + 1, cache.slot_frame[s] + 1))
            for s in range(cache.sink_frames, cache.num_slots) if cache.slot_frame[s] != EMPTY}


def simulate(frames, ring, choose):
    """The plain rule: the ring as a time-ordered list of spans; when full, `choose(spans)` gives
    the index i of the adjacent pair (i, i + 1) to merge (None: drop the oldest)."""
    spans = []
    for f in range(SINK, frames):
        if len(spans) == ring:
            i = choose(spans)
            if i is None:
                spans.pop(0)
            else:
                spans[i:i + 2] = [spans[i] + spans[i + 1]]
        spans.append([f])
    return spans


def fewest_frames(spans):
    return min(range(len(spans) - 1), key=lambda i: (len(spans[i]) + len(spans[i + 1]), i))


def mean_kv(kv, layer, frames):
    return (torch.stack([kv[layer][f][0] for f in frames]).mean(0), torch.stack([kv[layer][f][1] for f in frames]).mean(0))


def plain_attention(q, k, v, visible=None):
    """float64 softmax(q k^T / sqrt(D)) v per head; q [B, Lq, H, D]; visible [H, Lk] bool or None."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    if visible is not None:
        s = s.masked_fill(~visible[None, :, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v.double())


def pass_inputs(cache, start, seed=1):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, CHUNK * S, H, D, generator=gen)
    k_new = torch.randn(B, CHUNK * S, H, D, generator=gen)
    v_new = torch.randn(B, CHUNK * S, H, D, generator=gen)
    q_frames = list(range(start, start + CHUNK))
    layout = AttentionLayout.cached(q_frames, cache.layout_frames(start) + q_frames, S, CHUNK, WINDOW, SINK)
    return q, k_new, v_new, layout


def expected_keys(cache, kv, layer):
    """The cached keys/values slot by slot as the merge rule says: the mean of each slot's frames."""
    ks, vs = [], []
    for s in range(cache.used_slots):
        frames = [s] if s < cache.sink_frames else ring_spans(cache)[s]
        k, v = mean_kv(kv, layer, frames)
        ks.append(k)
        vs.append(v)
    return torch.cat(ks, 1), torch.cat(vs, 1)


@pytest.mark.parametrize("name,choose", [("temporal_merge", fewest_frames), ("sink_window", lambda spans: None)])
def test_merged_cache_is_the_plain_rule_and_attends_as_plain_softmax(name, choose):
    kv = frame_kv(FRAMES)
    cache = make_cache(name)
    for f in range(FRAMES):
        commit(cache, kv, f)
    spans = simulate(FRAMES, WINDOW - CHUNK, choose)
    assert sorted(ring_spans(cache).values()) == spans
    q, k_new, v_new, layout = pass_inputs(cache, FRAMES)
    for layer in range(L):
        k_exp, v_exp = expected_keys(cache, kv, layer)
        read = cache.used_slots * S
        torch.testing.assert_close(cache.k[layer][:, :read].double(), k_exp, rtol=0, atol=1e-6)
        torch.testing.assert_close(cache.v[layer][:, :read].double(), v_exp, rtol=0, atol=1e-6)
        assert layout.is_dense()                # every kept entry is visible
        k_all, v_all = cache.attention_kv(layer, read, k_new, v_new)
        out = cache.policy.attend(cache, layer, q, k_all, v_all, layout, "torch")
        want = plain_attention(q, torch.cat([k_exp, k_new.double()], 1), torch.cat([v_exp, v_new.double()], 1))
        torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)


def test_similar_merge_merges_the_most_alike_adjacent_pair():
    kv = frame_kv(FRAMES, seed=3)
    recent = 2
    cache = make_cache(f"similar_merge:recent={recent}")

    def most_alike(spans):
        sims = []
        for i in range(max(len(spans) - 1 - recent, 1)):
            total = 0.0
            for layer in range(L):
                a, b = mean_kv(kv, layer, spans[i])[0], mean_kv(kv, layer, spans[i + 1])[0]
                total += torch.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1).mean().item()
            sims.append(total / L)
        return max(range(len(sims)), key=lambda i: (sims[i], -i))

    for f in range(FRAMES):
        commit(cache, kv, f)
    assert sorted(ring_spans(cache).values()) == simulate(FRAMES, WINDOW - CHUNK, most_alike)
    assert any(len(s) > 1 for s in ring_spans(cache).values())
    for layer in range(L):
        k_exp, v_exp = expected_keys(cache, kv, layer)
        read = cache.used_slots * S
        torch.testing.assert_close(cache.k[layer][:, :read].double(), k_exp, rtol=0, atol=1e-6)
        torch.testing.assert_close(cache.v[layer][:, :read].double(), v_exp, rtol=0, atol=1e-6)


def test_attention_mass_is_the_softmax_mass_per_key_frame():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(B, 2 * S, H, D, generator=gen)
    k = torch.randn(B, 5 * S, H, D, generator=gen)
    layout = AttentionLayout.cached([6, 7], [0, 2, -1, 6, 7], S, 1, 4, 1)   # frame 2 outside the window
    got = attention_mass(q, k, layout, stride=1)
    mask = layout.token_mask()
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(D)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    want = p.reshape(B, H, 2 * S, 5, S).sum(-1).mean(2)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    assert got[..., 1].abs().max() == 0 and got[..., 2].abs().max() == 0


def test_deep_forcing_evicts_the_least_attended_frame_outside_the_recent():
    kv = frame_kv(FRAMES)
    recent = 2
    cache = make_cache(f"deep_forcing:recent={recent}")
    plain = make_cache("sink_window")
    ring = WINDOW - CHUNK
    for f in range(SINK + ring):
        commit(cache, kv, f)
        commit(plain, kv, f)
    start = SINK + ring
    q, k_new, v_new, layout = pass_inputs(cache, start)
    mass = torch.zeros(cache.num_slots, dtype=torch.float64)
    with torch.no_grad():
        for layer in range(L):
            read = cache.used_slots * S
            k_all, v_all = cache.attention_kv(layer, read, k_new, v_new)
            out = cache.policy.attend(cache, layer, q, k_all, v_all, layout, "torch")
            torch.testing.assert_close(out.double(), plain_attention(q, k_all, v_all), rtol=0, atol=1e-5)
            s = torch.einsum("bqhd,bkhd->bhqk", q[:, ::4].double(), k_all.double()) / math.sqrt(D)
            p = torch.softmax(s, -1).reshape(B, H, -1, cache.used_slots + CHUNK, S).sum(-1).mean(2)
            mass += p[..., :cache.num_slots].mean((0, 1))
    slots = sorted(range(SINK, cache.num_slots), key=lambda s_: cache.slot_frame[s_])[:ring - recent]
    evict = min(slots, key=lambda s_: mass[s_].item())
    frame = cache.slot_frame[evict]
    commit(cache, kv, start)
    assert frame not in cache.stored_frames and start in cache.stored_frames
    assert cache.slot_frame[evict] == start
    assert cache.policy.mass.abs().max() == 0          # the statistic is spent by the commit


def test_deep_forcing_without_statistics_evicts_the_oldest():
    kv = frame_kv(FRAMES)
    cache, plain = make_cache("deep_forcing:recent=1"), make_cache("sink_window")
    for f in range(FRAMES):
        commit(cache, kv, f)
        commit(plain, kv, f)
    assert cache.stored_frames == plain.stored_frames


def test_dummy_heads_pick_the_most_local_heads_and_see_a_short_context():
    kv = frame_kv(FRAMES)
    short = 1
    cache = make_cache(f"dummy_heads:fraction=0.5,short={short}")
    for f in range(FRAMES):
        commit(cache, kv, f)
    q, k_new, v_new, layout = pass_inputs(cache, FRAMES)
    ring_order = sorted(range(SINK, cache.num_slots), key=lambda s_: cache.slot_frame[s_])
    seen = torch.zeros(cache.used_slots + CHUNK, dtype=torch.bool)
    seen[:SINK] = True
    seen[ring_order[len(ring_order) - short:]] = True
    seen[cache.used_slots:] = True
    seen_tokens = seen.repeat_interleave(S)
    with torch.no_grad():
        for layer in range(L):
            read = cache.used_slots * S
            k_all, v_all = cache.attention_kv(layer, read, k_new, v_new)
            out = cache.policy.attend(cache, layer, q, k_all, v_all, layout, "torch")
            s = torch.einsum("bqhd,bkhd->bhqk", q[:, ::4].double(), k_all.double()) / math.sqrt(D)
            local = (torch.softmax(s, -1) * seen_tokens).sum(-1).mean((0, 2))          # [H]
            heads = sorted(sorted(range(H), key=lambda h: -local[h].item())[:H // 2])
            assert cache.policy.heads[layer] == heads
            visible = torch.ones(H, k_all.shape[1], dtype=torch.bool)
            visible[heads] = seen_tokens
            torch.testing.assert_close(out.double(), plain_attention(q, k_all, v_all, visible), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- the DiT
def toy_model():
    torch.manual_seed(0)
    return CausalDiT(DiTConfig.preset("toy", dim=32, ffn_dim=64, num_layers=2, num_heads=4, chunk_frames=2,
                                      sink_rope="adjacent"))


@pytest.fixture(scope="module")
def model():
    return toy_model()


def stream_x0(model, plan, frames):
    gen = torch.Generator().manual_seed(1)
    context = torch.randn(1, 4, model.config.text_dim, generator=gen)
    with torch.no_grad():
        return rollout(model, plan, context, Noise([3], model.config.in_channels, 4, 4), frames).x0


@pytest.mark.parametrize("policy", ["deep_forcing", "temporal_merge", "similar_merge", "dummy_heads:short=4"])
def test_every_policy_is_sink_window_while_the_budget_holds(model, policy):
    """A 10-frame stream in a 2-sink + 4-ring cache (window 6): no frame is ever evicted (and the
    short heads' context covers the ring): exactly the default cache's video."""
    base = Chunkwise(timesteps=[1000.0, 500.0], window_frames=6, sink_frames=2)
    want = stream_x0(model, base, 6)
    got = stream_x0(model, Chunkwise(timesteps=[1000.0, 500.0], window_frames=6, sink_frames=2,
                                     cache_policy=policy), 6)
    assert torch.equal(got, want)


@pytest.mark.parametrize("policy", sorted(set(POLICIES) - {"sink_window"}))
def test_long_streams_differ_from_sink_window_and_stay_finite(model, policy):
    plan = Rolling(timesteps=[1000.0, 500.0], window_frames=6, sink_frames=2, cache_policy=policy)
    got = stream_x0(model, plan, 16)
    want = stream_x0(model, Rolling(timesteps=[1000.0, 500.0], window_frames=6, sink_frames=2), 16)
    assert torch.isfinite(got).all() and not torch.equal(got, want)


def test_a_policy_state_continues_the_stream_bit_for_bit(model):
    plan = Chunkwise(timesteps=[1000.0, 500.0], window_frames=6, sink_frames=2, cache_policy="temporal_merge")
    gen = torch.Generator().manual_seed(1)
    context = torch.randn(1, 4, model.config.text_dim, generator=gen)
    noise = Noise([3], model.config.in_channels, 4, 4)
    with torch.no_grad():
        whole = rollout(model, plan, context, noise, 16).x0
        first = rollout(model, plan, context, noise, 10)
        state = first.cache.state_dict()
        cache = model.new_cache(1, 4, 4, window_frames=6, sink_frames=2, cache_policy="temporal_merge")
        cache.load_state_dict(state)
        rest = rollout(model, plan, None, noise, 6, cache=cache).x0
    assert torch.equal(torch.cat([first.x0, rest], 2), whole)


# ---------------------------------------------------------------------- specs
@pytest.mark.parametrize("spec,fragment", [("lru", "unknown policy 'lru'"), ("deep_forcing:keep=2", "not an option"),
                                           ("dummy_heads:fraction=2", "fraction"), ("temporal_merge:recent=1", "none")])
def test_bad_specs_fail_with_one_line(spec, fragment):
    with pytest.raises(ForcelabError, match=fragment) as e:
        make_policy(spec)
    assert "\n" not in str(e.value)


def test_a_merging_policy_needs_a_window(model):
    with pytest.raises(ForcelabError, match="set a window"):
        rollout(model, Chunkwise(timesteps=[1000.0], window_frames=0, cache_policy="temporal_merge"),
                torch.zeros(1, 4, model.config.text_dim), Noise([0], model.config.in_channels, 4, 4), 2)


STREAMING_RECIPES = ["rolling_forcing", "self_forcing_pp", "streaming_long"]


@pytest.mark.parametrize("recipe", STREAMING_RECIPES)
def test_every_streaming_recipe_takes_its_cache_policy_from_the_config(recipe):
    from pathlib import Path

    from forcelab.train.config import load_train_config
    from forcelab.train.recipe import recipe_class

    path = Path(__file__).resolve().parents[1] / "configs" / "toy" / f"{recipe}.yaml"
    cfg = load_train_config([path], ["algo.cache_policy=temporal_merge"])
    assert recipe_class(cfg.recipe).sampling_plan(cfg.algo).cache_policy == "temporal_merge"
    assert load_train_config([path]).algo.cache_policy == "sink_window"
    with pytest.raises(ForcelabError, match="algo.cache_policy"):
        load_train_config([path], ["algo.cache_policy=lru"])
