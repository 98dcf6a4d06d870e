"""KVCache: preallocated per-layer keys/values for streaming generation.

Layout of the self-attention store (one [B, (slots + chunk_frames) * S, H, D] buffer per
layer for keys and one for values, S = tokens per frame, allocated once):

    slots [0, sink_frames)            the sink: frames 0..sink_frames-1, kept forever
    slots [sink_frames, slots)        the ring: the most recent frames, oldest overwritten
    chunk_frames staging slots        scratch for the frames of the pass in flight

With a window of W frames and chunks of c frames, the ring holds W - c frames: exactly the
past frames the next chunk's queries can see (the window counts back from the end of the
query chunk and includes it), so in steady state every cached key is visible and the
attention call is dense. Without a window the ring holds `max_frames` frames and fills up.

Keys are stored AFTER the QK RMSNorm and AFTER RoPE, rotated at their RoPE position (frame +
rope_offset at commit time), together with their frame index (for visibility) and that
position. RoPE scores depend only on position differences, so queries rotated at their own
positions see cached keys exactly as if everything had been re-based to the window: no
cached key is ever re-rotated, except the sink under sink_rope="adjacent", whose position
moves with the window. Those few frames are also kept before RoPE (`sink_k`) and rotated
afresh for every pass (never rotated twice, so no rounding accumulates over a long stream).

A pass reads the used slots and its own keys as ONE contiguous range (`attention_kv`): its
new keys/values are copied into the slots right after the used ones (empty by definition,
or the staging slots), so no pass concatenates the whole cache. Passes that carry
gradients concatenate instead (the buffers are never part of an autograd graph).

Passes that carry gradients read the cache through `read` (a `CachedKV`). Under gradient
checkpointing their backward recomputes them, after later passes of the same rollout have
written the cache (a window's ring overwrites its oldest frames, the staging slots take every
pass's keys, a moving sink is rotated afresh): the recomputed pass must see exactly the keys
and values its forward saw. A `CachedKV` holds views of the store while the store still holds
what it read, and the cache copies them out just before it writes over them (copy on write):
a full cache that only grows copies nothing, a ring copies the frames it evicts.

Reading never changes the stored frames: a denoising pass calls the DiT with `commit=False`.
The clean pass (`commit=True`) writes the frames it saw; stored frames at or after its start
frame are dropped first, so re-committing (recache) is safe. Nothing is cloned per step.

Cross-attention K/V of the current prompt are cached per layer as well (`set_prompt` on the
DiT); replacing them is a prompt switch.

What a full ring keeps, merges or hides is the cache's policy (models/cache_policy.py; default
sink_window: evict the oldest ring frame, exactly the cache described above). A merge writes
over a cached slot, so it copies out live reads first like any other write.
"""

from __future__ import annotations

import weakref

import torch

from ..errors import ForcelabError
from ..kernels import apply_rope
from ..validate import non_negative_int, optional, positive_int
from .cache_policy import CachePolicy, make_policy
from .config import SINK_ROPE_POLICIES

EMPTY = -1


class CachedKV:
    """The cached keys and values one gradient-carrying pass attends to: k, v [B, read, H, D]
    (the first `read` cached key tokens, a moving sink already rotated for that pass).

    Views of the store while it still holds them; `KVCache` replaces a view by a copy just
    before writing over its tokens, so a recomputation (gradient checkpointing) reads what the
    forward read. k_view_from: first token of k that is a view (a rotated sink is a copy)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, k_view_from: int = 0):
        self.k, self.v = k, v
        self.policy_view = None      # what the cache policy attended with (CachePolicy.snapshot)
        self.tokens = v.shape[1]
        self._view_from = {"k": k_view_from if k_view_from < self.tokens else None, "v": 0}

    def before_write(self, lo: int, hi: int, kinds: tuple[str, ...]) -> None:
        """The store is about to write key tokens [lo, hi) of `kinds` ("k", "v"): copy what overlaps."""
        for kind in kinds:
            start = self._view_from[kind]
            if start is not None and lo < self.tokens and hi > start:
                setattr(self, kind, getattr(self, kind).clone())
                self._view_from[kind] = None

    @property
    def owns_all(self) -> bool:
        return all(start is None for start in self._view_from.values())


class KVCache:
    def __init__(self, *, num_layers: int, batch_size: int, tokens_per_frame: int, num_heads: int,
                 head_dim: int, chunk_frames: int, window_frames: int | None, sink_frames: int,
                 max_frames: int | None, sink_rope: str, dtype: torch.dtype, device=None,
                 cache_policy: str | CachePolicy | None = None):
        batch_size = positive_int(batch_size, "KVCache: batch_size")
        chunk_frames = positive_int(chunk_frames, "KVCache: chunk_frames")
        window_frames = optional(positive_int)(window_frames, "KVCache: window_frames (None: no window)")
        max_frames = optional(positive_int)(max_frames, "KVCache: max_frames")
        sink_frames = non_negative_int(sink_frames, "KVCache: sink_frames")
        policy = make_policy(cache_policy, "KVCache: cache_policy")
        if policy.needs_window and window_frames is None:
            raise ForcelabError(f"KVCache: cache policy {policy.name} decides what a full window keeps; "
                                f"set window_frames (without one every past frame is kept)")
        sink_rope = policy.sink_rope or sink_rope
        if window_frames is None:
            if max_frames is None:
                raise ForcelabError("KVCache: without window_frames the cache needs max_frames "
                                    "(how many frames it may hold); pass one or set a window")
            sink_frames, ring = 0, max_frames
        else:
            if window_frames < chunk_frames:
                raise ForcelabError(f"KVCache: window_frames ({window_frames}) must be at least "
                                    f"chunk_frames ({chunk_frames})")
            ring = window_frames - chunk_frames
        if sink_rope not in SINK_ROPE_POLICIES:
            raise ForcelabError(f"KVCache: sink_rope must be one of {SINK_ROPE_POLICIES}, got {sink_rope!r}")
        self.batch_size = batch_size
        self.chunk_frames = chunk_frames
        self.window_frames = window_frames
        self.sink_frames = sink_frames
        self.sink_rope = sink_rope
        self.tokens_per_frame = tokens_per_frame
        self.num_slots = sink_frames + ring
        self.capacity = self.num_slots + chunk_frames   # + the staging slots of one chunk
        shape = (batch_size, self.capacity * tokens_per_frame, num_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # the sink before RoPE, for the "adjacent" policy (its position moves with the window)
        sink_shape = (batch_size, sink_frames * tokens_per_frame, num_heads, head_dim)
        self.sink_k = ([torch.zeros(sink_shape, dtype=dtype, device=device) for _ in range(num_layers)]
                       if self.moves_sink else [])
        self.slot_frame = [EMPTY] * self.num_slots
        self.slot_position = [0] * self.num_slots
        self.slot_count = [1] * self.num_slots   # frames a slot holds (> 1 after a policy merged slots)
        self._merges = []                        # the commit in progress: merges before its writes
        self.rope_offset = 0     # added to frame indices to get RoPE positions (RoPE cut)
        self.end_frame = 0       # one past the last committed frame
        self._pending: list[int] = []  # slot of each frame of the commit in progress (layer 0 assigns)
        self.context_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        # per layer: CachedKV reads that a backward may recompute (weak: gone with their graph)
        self._readers: list[list[weakref.ref]] = [[] for _ in range(num_layers)]
        self.policy = policy
        policy.bind(self)

    # ------------------------------------------------------------------ inspection
    @property
    def moves_sink(self) -> bool:
        """True when the sink's RoPE position follows the window ("adjacent" policy)."""
        return self.sink_rope == "adjacent" and self.sink_frames > 0

    @property
    def stored_frames(self) -> list[int]:
        return sorted(f for f in self.slot_frame if f != EMPTY)

    @property
    def used_slots(self) -> int:
        """Slots [0, used_slots) are read at attention time (empty ones are masked)."""
        used = [i for i, f in enumerate(self.slot_frame) if f != EMPTY]
        return used[-1] + 1 if used else 0

    @property
    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in self.k + self.v + self.sink_k)
        if self.context_kv is not None:
            n += sum(t.numel() * t.element_size() for kv in self.context_kv for t in kv)
        return n

    def layout_frames(self, start: int) -> list[int]:
        """The frame id of slots [0, used_slots) in a pass's layout from frame `start`: stored
        frames at or after `start` are not visible (a re-commit replaces them); under a policy
        other than sink_window the ring slots are listed by recency rank (see cache_policy)."""
        frames = [fr if fr != EMPTY and fr < start else EMPTY for fr in self.slot_frame[:self.used_slots]]
        if self.policy.plain:
            return frames
        ring = sorted(((f, i) for i, f in enumerate(frames) if i >= self.sink_frames and f != EMPTY), reverse=True)
        for rank, (_, i) in enumerate(ring):
            frames[i] = start - 1 - rank
        return frames

    def key_positions(self, query_positions: list[int]) -> list[int]:
        """RoPE positions of slots [0, used_slots), under the sink policy.

        "true_distance": every key at its own position (the one its stored keys are rotated
        at). "adjacent": the sink frames sit just before the oldest non-sink frame in view
        (Rolling Forcing / Deep Forcing)."""
        used = self.used_slots
        pos = list(self.slot_position[:used])
        if self.sink_rope == "adjacent" and self.sink_frames:
            window = [p for i, p in enumerate(pos) if i >= self.sink_frames and self.slot_frame[i] != EMPTY]
            first = min(window + list(query_positions))
            for i in range(min(self.sink_frames, used)):
                pos[i] = first - self.sink_frames + i
        return pos

    # ------------------------------------------------------------------ prompt
    def set_context(self, context_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Cross-attention K/V per layer ([B, L, H, D] each): the prompt the cache serves."""
        if context_kv and context_kv[0][0].shape[0] != self.batch_size:
            raise ForcelabError(f"KVCache: a prompt batch of {context_kv[0][0].shape[0]} for a cache made for "
                                f"batch {self.batch_size}; give one prompt embedding per video")
        self.context_kv = context_kv

    # ------------------------------------------------------------------ reading
    def _rotated_sink(self, layer: int, read: int, sink_rope) -> torch.Tensor | None:
        """The moving sink's keys rotated at this pass's positions (a new tensor), or None."""
        if not (self.moves_sink and sink_rope is not None):
            return None
        tokens = min(self.sink_frames * self.tokens_per_frame, read)
        return apply_rope(self.sink_k[layer][:, :tokens], sink_rope[0][:tokens], sink_rope[1][:tokens])

    def read(self, layer: int, read: int, sink_rope: tuple[torch.Tensor, torch.Tensor] | None = None,
             *, recomputable: bool = False) -> CachedKV:
        """The first `read` cached key tokens of `layer` as a pass sees them (see attention_kv).
        recomputable: a backward will run this pass again (gradient checkpointing): the cache
        keeps the returned views valid by copying them out before it writes over them."""
        kb, vb = self.k[layer][:, :read], self.v[layer][:, :read]
        sink = self._rotated_sink(layer, read, sink_rope)
        if sink is not None:
            past = CachedKV(torch.cat([sink, kb[:, sink.shape[1]:]], dim=1), vb, k_view_from=read)
        else:
            past = CachedKV(kb, vb)
        past.policy_view = self.policy.snapshot(layer)
        if recomputable and not past.owns_all:
            self._readers[layer].append(weakref.ref(past))
        return past

    def _before_write(self, layer: int, lo: int, hi: int, kinds: tuple[str, ...] = ("k", "v")) -> None:
        """Copy out every live recomputable read of `layer` that tokens [lo, hi) would change."""
        alive = []
        for ref in self._readers[layer]:
            past = ref()
            if past is None:
                continue
            past.before_write(lo, hi, kinds)
            if not past.owns_all:
                alive.append(ref)
        self._readers[layer] = alive

    def attention_kv(self, layer: int, read: int, k_new: torch.Tensor, v_new: torch.Tensor,
                     sink_rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                     past: CachedKV | None = None):
        """Keys and values a pass attends to: the first `read` cached key tokens (the used
        slots when the pass began: a committing pass assigns slots in layer 0), then its own.

        k_new (rotated), v_new: [B, n, H, D]. sink_rope: (cos, sin) [sink tokens, D/2] at
        the sink's current positions when `moves_sink` (the sink keys are rotated afresh).
        past: the cached part as `read` returned it (passes that carry gradients).
        Returns k, v [B, read + n, H, D]: views of the store when the pass carries no
        gradient and fits (no copy of the cache), else a concatenation."""
        n = k_new.shape[1]
        kb, vb = self.k[layer], self.v[layer]
        # in the cache's dtype, as the cached part (under autocast v comes out in the autocast
        # dtype while the fp32 norm/RoPE tables promote k)
        k_new, v_new = k_new.to(kb.dtype), v_new.to(vb.dtype)
        if (past is None and not (k_new.requires_grad or v_new.requires_grad)
                and read + n <= kb.shape[1]):
            sink = self._rotated_sink(layer, read, sink_rope)
            self._before_write(layer, read, read + n)
            if sink is not None:
                self._before_write(layer, 0, sink.shape[1], kinds=("k",))
            with torch.no_grad():
                kb[:, read:read + n].copy_(k_new)
                vb[:, read:read + n].copy_(v_new)
                if sink is not None:
                    kb[:, :sink.shape[1]].copy_(sink)
            return kb[:, :read + n], vb[:, :read + n]
        past = past or self.read(layer, read, sink_rope)
        return torch.cat([past.k, k_new], dim=1), torch.cat([past.v, v_new], dim=1)

    def needs_pre_rope(self, start_frame: int) -> bool:
        """Whether a commit from start_frame writes sink frames that are kept before RoPE."""
        return self.moves_sink and start_frame < self.sink_frames

    # ------------------------------------------------------------------ writing
    def _slot_for(self, frame: int, start: int) -> int:
        if frame < self.sink_frames:
            return frame
        ring = range(self.sink_frames, self.num_slots)
        if not len(ring):
            return EMPTY  # a window of exactly one chunk keeps no past frames
        for s in ring:
            if self.slot_frame[s] == EMPTY:
                return s
        oldest = min(ring, key=lambda s: self.slot_frame[s])
        if self.window_frames is None:
            raise ForcelabError(f"KVCache: full at frame {frame} ({self.num_slots} frames); "
                                f"create it with a larger max_frames or a window_frames")
        if self.policy.plain:
            return oldest
        committed = sorted((s for s in ring if self.slot_frame[s] < start), key=lambda s: self.slot_frame[s])
        if not committed:             # a commit longer than the ring: its own newest frames win
            return oldest
        slot, merge = self.policy.make_room(self, frame, committed)
        if merge is not None:
            d, s = merge.dst, merge.src
            self.slot_position[d] = round(merge.w_dst * self.slot_position[d] + merge.w_src * self.slot_position[s])
            self.slot_frame[d] = max(self.slot_frame[d], self.slot_frame[s])
            self.slot_count[d] += self.slot_count[s]
            self._merges.append(merge)
        return slot

    def drop_from(self, frame: int) -> None:
        """Forget stored frames >= frame (before re-committing them)."""
        for s, f in enumerate(self.slot_frame):
            if f >= frame:
                self.slot_frame[s] = EMPTY
        self.end_frame = min(self.end_frame, frame)

    def write(self, layer: int, start_frame: int, k: torch.Tensor, v: torch.Tensor,
              k_pre_rope: torch.Tensor | None = None) -> None:
        """Store keys (rotated at frame + rope_offset) and values of frames
        [start_frame, start_frame + n).

        k, v: [B, n * S, H, D]. k_pre_rope: the same keys before RoPE, needed when
        `needs_pre_rope(start_frame)` (sink frames under the "adjacent" policy).
        Slots are assigned when layer 0 writes; all layers share them."""
        S = self.tokens_per_frame
        n = k.shape[1] // S
        if layer == 0:
            self.drop_from(start_frame)
            self._pending, self._merges = [], []
            for f in range(start_frame, start_frame + n):
                s = self._slot_for(f, start_frame)
                if s != EMPTY:
                    self.slot_frame[s] = f
                    self.slot_position[s] = f + self.rope_offset
                    self.slot_count[s] = 1
                self._pending.append(s)
            self.end_frame = start_frame + n
            self.policy.committed(self)
        # the last writer of a slot wins (a commit longer than the ring keeps its newest frames)
        last = {s: i for i, s in enumerate(self._pending) if s != EMPTY}
        if self.needs_pre_rope(start_frame) and k_pre_rope is None:
            raise ForcelabError("KVCache.write: sink frames under sink_rope='adjacent' need the "
                                "keys before RoPE (k_pre_rope)")
        kb = self.k[layer].view(k.shape[0], self.capacity, S, *k.shape[2:])
        vb = self.v[layer].view(kb.shape)
        ks, vs = k.view(k.shape[0], n, S, *k.shape[2:]), v.view(k.shape[0], n, S, *k.shape[2:])
        for m in self._merges:        # merged slots first: a source slot is about to take a new frame
            self._before_write(layer, m.dst * S, (m.dst + 1) * S)
        for s in last:
            self._before_write(layer, s * S, (s + 1) * S)
        with torch.no_grad():
            for m in self._merges:
                for buf in (kb, vb):
                    buf[:, m.dst].mul_(m.w_dst).add_(buf[:, m.src], alpha=m.w_src)
            for s, i in last.items():
                kb[:, s].copy_(ks[:, i])
                vb[:, s].copy_(vs[:, i])
                if s < self.sink_frames and self.moves_sink:
                    sink = self.sink_k[layer].view(k.shape[0], self.sink_frames, S, *k.shape[2:])
                    sink[:, s].copy_(k_pre_rope.view(ks.shape)[:, i])

    # ------------------------------------------------------------------ saving
    def state_dict(self) -> dict:
        """Everything a stream needs to continue bit for bit (tensors cloned to the CPU): the
        stored keys/values, the slot bookkeeping and the prompt's cross-attention K/V. The
        stored K/V were computed by the weights of their time, so a stream whose model keeps
        training (streaming long tuning) cannot rebuild them from latents; it saves them."""
        def copy(t):
            return t.detach().to("cpu", copy=True)
        kv = None if self.context_kv is None else [[copy(k), copy(v)] for k, v in self.context_kv]
        return {"k": [copy(t) for t in self.k], "v": [copy(t) for t in self.v],
                "sink_k": [copy(t) for t in self.sink_k],
                "slot_frame": list(self.slot_frame), "slot_position": list(self.slot_position),
                "slot_count": list(self.slot_count), "policy": self.policy.state_dict(),
                "rope_offset": self.rope_offset, "end_frame": self.end_frame, "context_kv": kv}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` into a cache made with the same shape options."""
        shapes = [tuple(t.shape) for t in state["k"]]
        if shapes != [tuple(t.shape) for t in self.k] or len(state["slot_frame"]) != self.num_slots:
            raise ForcelabError(f"KVCache: saved state has layers of shape {shapes[:1]} x {len(shapes)}, this "
                                f"cache {tuple(self.k[0].shape)} x {len(self.k)}; make it with the same options")
        for layer in range(len(self.k)):
            self._before_write(layer, 0, self.k[layer].shape[1])
        with torch.no_grad():
            for dst, src in zip(self.k + self.v + self.sink_k, state["k"] + state["v"] + state["sink_k"]):
                dst.copy_(src)
        self.slot_frame, self.slot_position = list(state["slot_frame"]), list(state["slot_position"])
        self.slot_count = list(state.get("slot_count", [1] * self.num_slots))   # states saved before policies: 1 each
        if state.get("policy"):
            self.policy.load_state_dict(state["policy"])
        self.rope_offset, self.end_frame = int(state["rope_offset"]), int(state["end_frame"])
        device = self.k[0].device
        self.context_kv = None if state["context_kv"] is None else [(k.to(device), v.to(device))
                                                                    for k, v in state["context_kv"]]

    # ------------------------------------------------------------------ clearing
    def reset(self, keep_sink: bool = False) -> None:
        """Clear the self-attention store (optionally keeping the sink); the prompt stays."""
        for s in range(self.num_slots):
            if not (keep_sink and s < self.sink_frames):
                self.slot_frame[s] = EMPTY
        if not keep_sink:
            self.end_frame = 0

    def flush(self, keep_last: int = 1) -> None:
        """Keep only the sink and the newest `keep_last` frames (Infinity-RoPE's KV flush)."""
        ring = [s for s in range(self.sink_frames, self.num_slots) if self.slot_frame[s] != EMPTY]
        ring.sort(key=lambda s: self.slot_frame[s])
        for s in ring[:max(len(ring) - keep_last, 0)]:
            self.slot_frame[s] = EMPTY
