"""Cache policies: what the one KV cache keeps, merges or hides when its window is full.

    cache = model.new_cache(B, H, W, window_frames=8, sink_frames=2, cache_policy="temporal_merge")
    policy = make_policy("deep_forcing:recent=2")        # NAME[:key=value,...]; the spec a plan carries

A policy decides, for the slots of `KVCache` (sink slots + ring slots of one frame each, the same
slots in every layer, a budget fixed when the cache is made):
- which ring slot a new frame takes when the ring is full (`make_room`): evict one, or merge two
  cached slots into one (the K/V of the merged slot, per layer, is the count-weighted mean of
  the two; the new frame takes the freed slot);
- how a pass attends (`attend`): the same call for every head, or per-head visibility.
Which frames are kept is one decision for every layer and every sample of the batch (the
attention layout is shared); the K/V each layer keeps for them are that layer's own.

Every policy keeps the budget: the same number of slots, the same bytes. A policy that keeps
something else than the newest frames lists its ring slots to the attention layout by recency
rank (the newest cached entry at frame start - 1, the next at start - 2, ...): the window rule
then counts cache entries, not frames, and every entry the policy kept is visible.

    sink_window     today's cache: the sink frames forever, the newest frames in a ring (StreamingLLM,
                    Self-Forcing / LongLive); the default, bit for bit the cache before policies.
    deep_forcing    Deep Forcing's participative compression: evict the ring frame that the
                    recent queries attend to least (the newest `recent` frames are never
                    evicted), with the deep sink re-aligned in RoPE (sink_rope "adjacent"; give
                    the sink about half the budget with --sink). Simplified: frames, not tokens,
                    are pruned, and the statistic is the last chunk's mean softmax mass.
    dummy_heads     Dummy Forcing's head-wise context allocation: a fraction of the heads (the
                    most local ones, measured once on the first pass that has hidden context)
                    see only the sink, the newest `short` cached frames and the pass itself.
                    Simplified: the short heads share the one cache (no memory saved).
    temporal_merge  TempCache-style temporal compression: when full, the adjacent pair of ring
                    slots holding the fewest frames (the oldest on ties) is averaged into one
                    slot: nothing is evicted, every past frame stays in some span, the spans
                    grow with the stream and the newest frame is always on its own, so a fixed
                    budget covers the whole past, ever more coarsely. Simplified: no sparse attention.
    similar_merge   KV merging of similar tokens (as in the KV-merging / MiniCache line): when
                    full, the adjacent pair of ring slots whose keys are most alike (cosine, mean
                    over layers and the batch) is merged, weighted by the frames each holds; the
                    newest `recent` frames are spared while other pairs exist. Simplified: whole frames are merged
                    token by token (same spatial token), not free token pairs.
Merged keys are averaged as stored (after RoPE) and carry one slot's attention weight (no
size bias); the merged slot's position is the count-weighted mean of its frames' positions (a
moving sink sits just before the oldest kept entry). A merged slot counts as its newest frame:
a re-commit from frame f drops every slot holding a frame >= f, merged span and all.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..errors import ForcelabError
from ..kernels import AttentionLayout, attention
from ..validate import non_negative_int, unit_interval

DEFAULT_POLICY = "sink_window"
QUERY_STRIDE = 4             # attention statistics read every 4th query token (a cheap, unbiased sample) ...
STAT_QUERIES = 256           # ... and at most this many (a Wan chunk has 4,680): one head's scores stay ~33 MB at 32K keys
DUMMY_FRACTION = 0.25        # Dummy Forcing: about a quarter of the heads need little context


@dataclass(frozen=True)
class Merge:
    """Slot `src` is averaged into slot `dst`: dst = w_dst * dst + w_src * src (w_dst + w_src = 1)."""

    dst: int
    src: int
    w_dst: float
    w_src: float


def attention_mass(q: torch.Tensor, k: torch.Tensor, layout: AttentionLayout,
                   stride: int | None = None) -> torch.Tensor:
    """Mean softmax mass each key frame receives: [B, H, Fk] (float32), from every `stride`-th
    query token of q [B, Lq, H, D] against k [B, Lk, H, D] under `layout` (scale 1/sqrt(D);
    default stride: QUERY_STRIDE, coarser when that leaves more than STAT_QUERIES queries). One
    head at a time, a separate computation: the attention output is not touched. Queries that
    see no key add 0."""
    stride = stride or max(QUERY_STRIDE, -(-q.shape[1] // STAT_QUERIES))
    qs, kf = q[:, ::stride].float(), k.float()
    mask = layout.token_mask(q.device)[::stride]
    heads = []
    for h in range(q.shape[2]):
        scores = torch.einsum("bqd,bkd->bqk", qs[:, :, h], kf[:, :, h]) / math.sqrt(q.shape[-1])
        p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
        heads.append(p.unflatten(-1, (-1, layout.tokens_per_frame)).sum(-1).mean(1))
    return torch.stack(heads, 1)


class CachePolicy:
    """Sink + window (the default): the sink frames kept forever, the oldest ring frame evicted."""

    name = DEFAULT_POLICY
    plain = True             # layout and attention exactly as the cache had them before policies
    needs_window = False     # only meaningful when the ring can fill (a window is set)
    sink_rope: str | None = None   # a policy may fix the sink's RoPE rule (None: the model's)

    def bind(self, cache) -> None:
        """Called once by the cache it serves (its sizes: layers, heads, slots, chunk)."""

    # ------------------------------------------------------------------ slots
    def make_room(self, cache, frame: int, ring: list[int]) -> tuple[int, Merge | None]:
        """The ring is full and `frame` arrives: (the slot it takes, a merge done first or None).
        ring: the ring slots holding committed frames (earlier than this commit), oldest first."""
        return ring[0], None

    def committed(self, cache) -> None:
        """Layer 0 assigned the slots of a commit (statistics of the last chunk are spent)."""

    # ------------------------------------------------------------------ attention
    def snapshot(self, layer: int):
        """What `attend` needs to redo a gradient-carrying pass exactly (kept with its CachedKV)."""
        return None

    def attend(self, cache, layer: int, q, k, v, layout: AttentionLayout, backend, *, past=None,
               commit: bool = False) -> torch.Tensor:
        return attention(q, k, v, layout, backend=backend)

    # ------------------------------------------------------------------ saving
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


SinkWindow = CachePolicy


@dataclass
class DeepForcing(CachePolicy):
    """Deep Forcing: deep sink (sink_rope "adjacent") + participative compression (evict the
    ring frame the recent queries attend to least; the newest `recent` frames stay)."""

    recent: int | None = None        # newest frames never evicted (None: half the ring)
    name = "deep_forcing"
    plain = False
    needs_window = True
    sink_rope = "adjacent"

    def bind(self, cache) -> None:
        super().bind(cache)
        self.mass = torch.zeros(len(cache.k), cache.num_slots, dtype=torch.float32, device=cache.k[0].device)

    def kept_recent(self, cache) -> int:
        ring = cache.num_slots - cache.sink_frames
        return ring // 2 if self.recent is None else self.recent

    def make_room(self, cache, frame, ring):
        candidates = ring[:max(len(ring) - self.kept_recent(cache), 0)]
        if not candidates:
            return ring[0], None
        score = self.mass.sum(0).tolist()
        return min(candidates, key=lambda s: (score[s], cache.slot_frame[s])), None   # least mass, oldest on ties

    def committed(self, cache) -> None:
        self.mass.zero_()

    def attend(self, cache, layer, q, k, v, layout, backend, *, past=None, commit=False):
        out = attention(q, k, v, layout, backend=backend)
        if not (commit or torch.is_grad_enabled()):      # the recent queries: the chunks being denoised
            cached = layout.k_frames.numel() - layout.q_frames.numel()
            with torch.no_grad():
                self.mass[layer, :cached] += attention_mass(q, k, layout)[..., :cached].mean((0, 1))
        return out

    def state_dict(self) -> dict:
        return {"mass": self.mass.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.mass.copy_(state["mass"])


@dataclass
class DummyHeads(CachePolicy):
    """Dummy Forcing: `fraction` of the heads of each layer (the most local, measured) see only
    the sink, the newest `short` cached frames and the pass's own frames; the others see all."""

    fraction: float = DUMMY_FRACTION
    short: int = 0                   # cached non-sink frames a short head still sees
    name = "dummy_heads"
    plain = False

    def bind(self, cache) -> None:
        super().bind(cache)
        self.heads: list[list[int] | None] = [None] * len(cache.k)   # per layer: its short heads (None: not measured)
        self._short: tuple | None = None
        self._index: dict = {}

    def short_layout(self, cache, layout: AttentionLayout) -> AttentionLayout | None:
        """The layout of the short heads, or None when it hides nothing (the same as `layout`)."""
        if self._short is not None and self._short[0] is layout:
            return self._short[1]
        n_q = layout.q_frames.numel()
        frames = layout.k_frames.tolist()
        cached = frames[:len(frames) - n_q]
        ring = sorted((f, i) for i, f in enumerate(cached) if i >= cache.sink_frames and f >= 0)
        hidden = [i for _, i in ring[:max(len(ring) - self.short, 0)]]
        short = None
        if hidden:
            for i in hidden:
                frames[i] = -1
            short = AttentionLayout.cached(layout.q_frames.tolist(), frames, layout.tokens_per_frame,
                                           layout.chunk_frames, layout.window_frames, layout.sink_frames)
        self._short = (layout, short)
        return short

    def calibrate(self, layer: int, q, k, layout, short: AttentionLayout) -> None:
        """The most local heads: largest mass on what a short head sees (sink, newest frames, itself)."""
        keep = (short.k_frames >= 0).to(q.device)
        local = (attention_mass(q, k, layout) * keep).sum(-1).mean(0)       # [H]
        count = round(self.fraction * q.shape[2])
        order = sorted(range(q.shape[2]), key=lambda h: (-float(local[h]), h))
        self.heads[layer] = sorted(order[:count])

    def snapshot(self, layer: int):
        return self.heads[layer]

    def attend(self, cache, layer, q, k, v, layout, backend, *, past=None, commit=False):
        short = self.short_layout(cache, layout)
        heads = past.policy_view if past is not None else self.heads[layer]
        if short is not None and heads is None and not torch.is_grad_enabled():
            with torch.no_grad():
                self.calibrate(layer, q, k, layout, short)
            heads = self.heads[layer]
        if short is None or not heads:
            return attention(q, k, v, layout, backend=backend)
        idx_s, idx_l, inverse = self._head_index(tuple(heads), q.shape[2], q.device)
        parts = [attention(*(t.index_select(2, idx_s) for t in (q, k, v)), short, backend=backend)]
        if idx_l.numel():
            parts.append(attention(*(t.index_select(2, idx_l) for t in (q, k, v)), layout, backend=backend))
        return torch.cat(parts, dim=2).index_select(2, inverse)

    def _head_index(self, heads: tuple, num_heads: int, device):
        """(short heads, long heads, the order that puts [short | long] back) as index tensors,
        made once per head set and device (no host-to-device copy per layer and pass)."""
        key = (heads, num_heads, str(device))
        if key not in self._index:
            long = [h for h in range(num_heads) if h not in heads]
            idx_s, idx_l = (torch.tensor(ix, dtype=torch.long, device=device) for ix in (heads, long))
            self._index[key] = (idx_s, idx_l, torch.argsort(torch.cat([idx_s, idx_l])))
        return self._index[key]

    def state_dict(self) -> dict:
        return {"heads": [None if h is None else list(h) for h in self.heads]}

    def load_state_dict(self, state: dict) -> None:
        self.heads = [None if h is None else list(h) for h in state["heads"]]


def _merge(cache, a: int, b: int) -> Merge:
    """Average slot b (the newer) into slot a, weighted by the frames each holds."""
    ca, cb = cache.slot_count[a], cache.slot_count[b]
    return Merge(a, b, ca / (ca + cb), cb / (ca + cb))


@dataclass
class TemporalMerge(CachePolicy):
    """TempCache-style: merge the adjacent ring pair holding the fewest frames (oldest on ties)."""

    name = "temporal_merge"
    plain = False
    needs_window = True

    def make_room(self, cache, frame, ring):
        if len(ring) < 2:
            return ring[0], None
        counts = [cache.slot_count[s] for s in ring]
        i = min(range(len(ring) - 1), key=lambda j: (counts[j] + counts[j + 1], j))
        return ring[i + 1], _merge(cache, ring[i], ring[i + 1])


@dataclass
class SimilarMerge(CachePolicy):
    """KV merging: merge the adjacent ring pair whose keys are most alike (cosine similarity,
    mean over layers and the batch), weighted; the newest `recent` frames are merged only when
    no other pair is left (a commit of several frames shrinks the choice frame by frame)."""

    recent: int = 1                  # newest cached frames kept out of merges while other pairs exist
    name = "similar_merge"
    plain = False
    needs_window = True

    def make_room(self, cache, frame, ring):
        if len(ring) < 2:
            return ring[0], None
        pairs = [(ring[j], ring[j + 1]) for j in range(max(len(ring) - 1 - self.recent, 1))]
        sim = key_similarity(cache, pairs).tolist()
        j = max(range(len(pairs)), key=lambda i: (sim[i], -i))       # most alike, oldest on ties
        return pairs[j][1], _merge(cache, *pairs[j])


def key_similarity(cache, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """[len(pairs)] mean over layers and samples of the cosine similarity of two slots' keys."""
    S = cache.tokens_per_frame
    a = torch.tensor([p[0] for p in pairs])
    b = torch.tensor([p[1] for p in pairs])
    total = torch.zeros(len(pairs), dtype=torch.float32)
    for k in cache.k:
        slots = k.view(k.shape[0], cache.capacity, S * k.shape[2] * k.shape[3]).float()
        total += torch.cosine_similarity(slots[:, a], slots[:, b], dim=-1).mean(0).cpu()
    return total / len(cache.k)


POLICIES = {cls.name: cls for cls in (SinkWindow, DeepForcing, DummyHeads, TemporalMerge, SimilarMerge)}
_CHECKS = {"recent": non_negative_int, "short": non_negative_int, "fraction": unit_interval}


def make_policy(spec: "str | CachePolicy | None", what: str = "cache policy") -> CachePolicy:
    """A policy from its spec NAME[:key=value,...] (None: sink_window); a policy passes through.
    Bad names and options: one ForcelabError naming `what` and what is allowed."""
    if isinstance(spec, CachePolicy):
        return spec
    name, _, options = (spec or DEFAULT_POLICY).strip().partition(":")
    if name not in POLICIES:
        raise ForcelabError(f"{what} {spec!r}: unknown policy {name!r}; choose one of {sorted(POLICIES)} "
                            f"(options as NAME:key=value,...)")
    cls = POLICIES[name]
    allowed = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
    kwargs = {}
    for item in filter(None, (o.strip() for o in options.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            raise ForcelabError(f"{what} {spec!r}: {item!r} is not an option of {name} "
                                f"(its options: {', '.join(allowed) or 'none'}; write key=value)")
        kwargs[key] = _CHECKS[key](value, f"{what} {spec!r}: {key}")
    return cls(**kwargs)


def check_policy(spec, what: str = "cache policy") -> str:
    """The spec, validated (a config `setting` rule, a CLI flag's type and a plan field check)."""
    make_policy(spec, what or "cache policy")
    return spec if spec is not None else DEFAULT_POLICY
