"""Attention layouts: who sees whom, described per frame.

Every attention call in forcelab is described by an `AttentionLayout`: the latent frame index
of every query frame and key frame (tokens_per_frame tokens each) plus a visibility rule.
The rule is evaluated on frames, never on tokens, so a layout is tiny even for 32,760-token
sequences, and the same object drives the torch reference (a boolean mask) and the Triton
kernels (per-tile key ranges).

Rule, for a query frame qf and key frame kf (frame indices are absolute positions in the
video; -1 marks an empty cache slot, never visible):

- chunk_frames is None: every key is visible (bidirectional).
- block-causal: chunk(f) = f // chunk_frames; kf is visible iff chunk(kf) <= chunk(qf).
- window_frames (block-causal only): additionally kf >= end(chunk(qf)) - window_frames, i.e.
  the window counts back from the END of the query's chunk and includes that chunk
  (Self-Forcing's local attention), ...
- ... unless kf < sink_frames: the first sink_frames frames stay visible to every query.
- teacher forcing: frames also carry a "noisy" flag ([clean | noisy] copies of one video).
  A noisy key is visible only to noisy queries of the same chunk; a noisy query sees clean
  keys of strictly earlier chunks; clean queries follow the block-causal rule over clean keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


LAYOUTS_KEPT = 4   # layouts shared between calls with equal arguments (each memoises its masks)


def _frames(x) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.long)
    if t.ndim != 1:
        raise ValueError(f"frame indices must be 1-D, got shape {tuple(t.shape)}")
    return t.cpu()


@dataclass(frozen=True, eq=False)
class AttentionLayout:
    """Frame-level description of an attention pattern.

    q_frames: [Fq] frame index of each query frame; k_frames: [Fk] frame index of each key
    frame (-1 = empty slot). Queries are Fq * tokens_per_frame tokens, keys likewise.
    """

    q_frames: torch.Tensor
    k_frames: torch.Tensor
    tokens_per_frame: int
    chunk_frames: int | None = None
    window_frames: int | None = None
    sink_frames: int = 0
    q_noisy: torch.Tensor | None = None
    k_noisy: torch.Tensor | None = None

    def __post_init__(self):
        if self.tokens_per_frame < 1:
            raise ValueError(f"tokens_per_frame must be >= 1, got {self.tokens_per_frame}")
        if self.chunk_frames is not None and self.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {self.chunk_frames}")
        if self.window_frames is not None:
            if self.chunk_frames is None:
                raise ValueError("window_frames needs a block-causal layout (chunk_frames)")
            if self.window_frames < self.chunk_frames:
                raise ValueError(
                    f"window_frames ({self.window_frames}) must cover at least one chunk "
                    f"({self.chunk_frames} frames)")
        if self.sink_frames < 0:
            raise ValueError(f"sink_frames must be >= 0, got {self.sink_frames}")
        if (self.q_noisy is None) != (self.k_noisy is None):
            raise ValueError("q_noisy and k_noisy go together (teacher-forcing layout)")

    # ------------------------------------------------------------------ constructors
    @classmethod
    @lru_cache(maxsize=LAYOUTS_KEPT)
    def full(cls, frames: int, tokens_per_frame: int) -> "AttentionLayout":
        """Bidirectional attention over `frames` frames (the teacher / critic)."""
        f = torch.arange(frames)
        return cls(f, f, tokens_per_frame)

    @classmethod
    @lru_cache(maxsize=LAYOUTS_KEPT)
    def block_causal(cls, frames: int, tokens_per_frame: int, chunk_frames: int,
                     window_frames: int | None = None, sink_frames: int = 0,
                     start_frame: int = 0) -> "AttentionLayout":
        """Block-causal attention over frames [start_frame, start_frame + frames)."""
        f = torch.arange(start_frame, start_frame + frames)
        return cls(f, f, tokens_per_frame, chunk_frames, window_frames, sink_frames)

    @classmethod
    @lru_cache(maxsize=LAYOUTS_KEPT)
    def teacher_forcing(cls, frames: int, tokens_per_frame: int, chunk_frames: int,
                        window_frames: int | None = None,
                        sink_frames: int = 0) -> "AttentionLayout":
        """[clean | noisy] copies of one `frames`-frame video, concatenated along tokens."""
        f = torch.arange(frames).repeat(2)
        noisy = torch.arange(2 * frames) >= frames
        return cls(f, f, tokens_per_frame, chunk_frames, window_frames, sink_frames,
                   q_noisy=noisy, k_noisy=noisy)

    @classmethod
    def cached(cls, query_frames, key_frames, tokens_per_frame: int, chunk_frames: int,
               window_frames: int | None = None, sink_frames: int = 0) -> "AttentionLayout":
        """Streaming: queries = the frames being denoised, keys = cache slots + those frames.

        key_frames holds the frame index of every key frame in the order the keys are laid
        out (cache slots in any order, -1 for empty slots, then the query frames).
        Layouts given as sequences of ints are shared: every denoising pass of a chunk, and
        its commit, reuse one layout and the masks it memoises."""
        if isinstance(query_frames, torch.Tensor) or isinstance(key_frames, torch.Tensor):
            return cls(_frames(query_frames), _frames(key_frames), tokens_per_frame,
                       chunk_frames, window_frames, sink_frames)
        return _shared_cached(cls, tuple(int(f) for f in query_frames), tuple(int(f) for f in key_frames),
                              tokens_per_frame, chunk_frames, window_frames, sink_frames)

    # ------------------------------------------------------------------ the rule
    @property
    def num_queries(self) -> int:
        return self.q_frames.numel() * self.tokens_per_frame

    @property
    def num_keys(self) -> int:
        return self.k_frames.numel() * self.tokens_per_frame

    def _memo(self, key, compute):
        """Masks are computed once per layout: the DiT reuses one layout in every layer."""
        memo = self.__dict__.setdefault("_memo_masks", {})
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    def frame_mask(self) -> torch.Tensor:
        """[Fq, Fk] bool: True where the key frame is visible to the query frame (shared:
        do not modify in place)."""
        return self._memo("frames", self._frame_mask)

    def _frame_mask(self) -> torch.Tensor:
        qf = self.q_frames[:, None]
        kf = self.k_frames[None, :]
        valid = kf >= 0
        if self.chunk_frames is None:
            return valid.expand(qf.shape[0], kf.shape[1]).clone()
        c = self.chunk_frames
        qc, kc = qf // c, kf // c
        if self.q_noisy is None:
            causal = kc <= qc
        else:
            qn, kn = self.q_noisy[:, None], self.k_noisy[None, :]
            causal = torch.where(kn, qn & (kc == qc), torch.where(qn, kc < qc, kc <= qc))
        visible = causal
        if self.window_frames is not None:
            in_window = kf >= (qc + 1) * c - self.window_frames
            visible = visible & in_window
        if self.sink_frames > 0:
            sink = kf < self.sink_frames
            if self.q_noisy is not None:
                sink = sink & ~self.k_noisy[None, :]
            visible = visible | (sink & causal)
        return visible & valid

    def is_dense(self) -> bool:
        """True when every key is visible to every query (no mask needed)."""
        return self._memo("dense", lambda: bool(self.frame_mask().all()))

    def token_mask(self, device=None) -> torch.Tensor:
        """[Lq, Lk] bool mask over tokens (the torch reference's SDPA mask; shared)."""
        s = self.tokens_per_frame
        device = torch.device(device) if device is not None else torch.device("cpu")
        return self._memo(("tokens", device), lambda: self.frame_mask().repeat_interleave(s, 0)
                          .repeat_interleave(s, 1).to(device))

    def empty_query_rows(self, device=None) -> torch.Tensor | None:
        """[Lq] bool: query tokens that see no key (their output is zero), None when every query
        sees one. From the host-side frame mask: asking costs no device synchronisation."""
        def compute():
            empty = ~self.frame_mask().any(dim=1)
            if not bool(empty.any()):
                return None
            device_ = torch.device(device) if device is not None else torch.device("cpu")
            return empty.repeat_interleave(self.tokens_per_frame).to(device_)
        return self._memo(("empty", None if device is None else torch.device(device)), compute)

    def visible_pairs(self) -> int:
        """Number of visible (query token, key token) pairs: the FLOP count's basis."""
        return int(self.frame_mask().sum()) * self.tokens_per_frame ** 2

    # ------------------------------------------------------------------ kernel inputs
    def key(self) -> tuple:
        """A hashable summary of the layout's content (two equal layouts share kernel plans)."""
        def flags(t):
            return None if t is None else tuple(t.tolist())
        return (tuple(self.q_frames.tolist()), tuple(self.k_frames.tolist()),
                self.tokens_per_frame, self.chunk_frames, self.window_frames,
                self.sink_frames, flags(self.q_noisy), flags(self.k_noisy))

    def tile_visibility(self, block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Which (query tile, key tile) pairs hold visible pairs: (any, all), [Tq, Tk] bool.

        Query tile i holds query tokens [i * block_m, (i + 1) * block_m), key tile j likewise
        with block_n; a tile past the sequence end is cut short. `any` marks tiles with at
        least one visible pair (a kernel must visit them), `all` tiles whose every token pair
        is visible. Computed on frames with a 2-D prefix sum, so it costs O(Fq * Fk + Tq * Tk)
        and never builds the token mask."""
        s = self.tokens_per_frame
        visible = self.frame_mask().long()
        counts = torch.zeros(visible.shape[0] + 1, visible.shape[1] + 1, dtype=torch.long)
        counts[1:, 1:] = visible.cumsum(0).cumsum(1)

        def frame_span(num_tokens, block):
            first = torch.arange(0, num_tokens, block)
            last = torch.clamp(first + block, max=num_tokens) - 1
            return first // s, last // s          # first and last frame touched by each tile

        q_lo, q_hi = frame_span(self.num_queries, block_m)
        k_lo, k_hi = frame_span(self.num_keys, block_n)
        q_lo, q_hi1 = q_lo[:, None], q_hi[:, None] + 1
        k_lo, k_hi1 = k_lo[None, :], k_hi[None, :] + 1
        pairs = (counts[q_hi1, k_hi1] - counts[q_lo, k_hi1]
                 - counts[q_hi1, k_lo] + counts[q_lo, k_lo])
        frame_pairs = (q_hi1 - q_lo) * (k_hi1 - k_lo)
        return pairs > 0, pairs == frame_pairs

    def mask_key(self) -> tuple:
        """A hashable summary of WHO SEES WHOM (frame mask, sizes), without the frame ids:
        everything the tile tables depend on. Consecutive chunks of a stream have different
        frame ids but, once the cache is in steady state, the same mask key."""
        def compute():
            mask = self.frame_mask()
            return (tuple(mask.shape), mask.numpy().tobytes(), self.tokens_per_frame)
        return self._memo("mask key", compute)

    def tile_runs(self, block_m: int, block_n: int, by: str = "query") -> "TileRuns":
        """The host-side visit table of the Triton kernels (CSR of runs, int32, on the CPU).

        by="query": for every query tile, the key tiles it must visit (forward and dQ);
        by="key": for every key tile, the query tiles (dK/dV). A row's visits are runs of
        contiguous tiles of the same kind: runs of fully visible tiles that are not cut
        short by the sequence end come first (the kernel skips the mask there), then runs
        of partially visible ones; fully masked tiles are absent. `order` lists the rows
        heaviest first (most tiles to visit), the order the kernels launch them in."""
        if by not in ("query", "key"):
            raise ValueError(f"tile_runs: by must be 'query' or 'key', got {by!r}")
        any_visible, all_visible = self.tile_visibility(block_m, block_n)
        complete_q = torch.arange(1, any_visible.shape[0] + 1) * block_m <= self.num_queries
        complete_k = torch.arange(1, any_visible.shape[1] + 1) * block_n <= self.num_keys
        full = all_visible & complete_q[:, None] & complete_k[None, :]
        if by == "key":
            any_visible, full = any_visible.T, full.T
        rows, cols = any_visible.shape
        kind = any_visible.to(torch.int8) + full.to(torch.int8)  # 0 absent, 1 partial, 2 full
        padded = torch.zeros(rows, cols + 2, dtype=torch.int8)
        padded[:, 1:-1] = kind
        change = padded[:, 1:] != padded[:, :-1]                   # [rows, cols + 1]: before col j
        run_row, lo = (change & (padded[:, 1:] != 0)).nonzero(as_tuple=True)
        _, hi = (change & (padded[:, :-1] != 0)).nonzero(as_tuple=True)
        partial = kind[run_row, lo] == 1
        # Sort runs by (row, partial?, first tile): full runs first within a row.
        rank = (run_row * 2 + partial) * (cols + 1) + lo
        order = rank.argsort()
        runs = torch.stack((lo[order], hi[order]), 1)
        start = torch.zeros(rows + 1, dtype=torch.long)
        start[1:] = torch.bincount(run_row, minlength=rows).cumsum(0)
        num_full = torch.bincount(run_row[~partial], minlength=rows)
        heaviest = any_visible.sum(1).argsort(descending=True, stable=True)
        return TileRuns(start.int(), num_full.int(), runs.int().contiguous(), heaviest.int())

    def frame_ids(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """([Fq], [Fk], [Fq], [Fk]) int32: frame index and noisy flag of every query and key
        frame (-1 = empty slot; flags 0 without teacher forcing), the kernels' per-frame ids
        (token t belongs to frame t // tokens_per_frame)."""
        zeros_q = torch.zeros(self.q_frames.numel(), dtype=torch.int32)
        zeros_k = torch.zeros(self.k_frames.numel(), dtype=torch.int32)
        return (self.q_frames.int(), self.k_frames.int(),
                zeros_q if self.q_noisy is None else self.q_noisy.int(),
                zeros_k if self.k_noisy is None else self.k_noisy.int())


@lru_cache(maxsize=LAYOUTS_KEPT)
def _shared_cached(cls, query_frames: tuple, key_frames: tuple, tokens_per_frame, chunk_frames,
                   window_frames, sink_frames) -> AttentionLayout:
    return cls(_frames(query_frames), _frames(key_frames), tokens_per_frame, chunk_frames,
               window_frames, sink_frames)


@dataclass(frozen=True)
class TileRuns:
    """Per-tile visits as runs of contiguous tiles, in CSR form. Row r owns runs
    [start[r], start[r + 1]); the first num_full[r] of them are fully visible; run i covers
    tiles [runs[i, 0], runs[i, 1]). start [T + 1], num_full [T], runs [R, 2], order [T]
    (rows heaviest first): int32."""

    start: torch.Tensor
    num_full: torch.Tensor
    runs: torch.Tensor
    order: torch.Tensor

    def tiles(self, row: int) -> list[int]:
        """Every tile row `row` visits, in visiting order (tests and inspection)."""
        lo_hi = self.runs[self.start[row]:self.start[row + 1]].tolist()
        return [t for lo, hi in lo_hi for t in range(lo, hi)]

    def num_full_tiles(self, row: int) -> int:
        first = int(self.start[row])
        return int(sum(hi - lo for lo, hi in self.runs[first:first + self.num_full[row]].tolist()))

    @property
    def num_visits(self) -> int:
        return int((self.runs[:, 1] - self.runs[:, 0]).sum())
