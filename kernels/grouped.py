"""Masked attention on the torch path as a few unmasked SDPA calls, one per query group.

The visibility rule of `AttentionLayout` is evaluated on frames, and every token of a frame
shares its frame's row of `frame_mask()`. Consecutive query frames whose rows are identical
therefore see exactly the same key tokens: together they form a rectangle of the token mask
in which every pair is visible. The plan cuts the queries into such groups (block-causal:
one per chunk; teacher forcing: the clean and the noisy copy of each chunk; a streaming
chunk against its cache: usually one) and lists each group's visible keys as runs of
consecutive key frames (a prefix for block-causal; sink + window: two runs).

Each group is then one SDPA call WITHOUT a mask over its visible keys only: a run is a slice
of k and v (a view), several runs are concatenated. A group that sees no key gets zeros.
The outputs are concatenated along the tokens, so no [Lq, Lk] tensor is built anywhere, and
the work is proportional to the visible pairs instead of all pairs plus a mask. Autograd
runs through the slices and concatenations.

The plan is computed once per layout from the host-side frame mask (ints on the CPU): a call
makes no host-device synchronisation.

When it pays (`use_groups`): every extra SDPA call has a fixed cost, and every group re-reads
(and in the backward re-writes) its visible keys, so small groups over tiny sequences are
slower than one masked call. Measured on one CPU core (bench/attention.py, bench/RESULTS.md):
one more SDPA forward + backward costs about 55 us, the time of ~0.5M multiply-adds of
attention (forward alone: ~15 us, the same ~0.5M); groups of 16 query tokens lost to the
dense mask (0.5-0.8x forward + backward) however much they skipped, groups of 24 tied and
groups of 32 or more won once the skipped work paid for the extra calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layout import AttentionLayout


@dataclass(frozen=True)
class QueryGroup:
    """Query tokens [queries[0], queries[1]) see exactly the key tokens of `keys`, a tuple of
    token ranges [start, end) in increasing order (empty: the group sees no key)."""

    queries: tuple[int, int]
    keys: tuple[tuple[int, int], ...]

    @property
    def num_queries(self) -> int:
        return self.queries[1] - self.queries[0]

    @property
    def num_keys(self) -> int:
        return sum(end - start for start, end in self.keys)


# Multiply-adds (batch x heads x head dim x skipped pairs) that one more SDPA call, forward
# and backward, costs. CPU: measured (~55 us per call on one core, see above). CUDA: an
# estimate, not a measurement: ~10 us of kernel launches per extra call at ~10 T
# multiply-adds/s for fp32 attention (the torch path serves fp32 on a GPU).
MACS_PER_EXTRA_CALL = {"cpu": 5e5, "cuda": 1e8}
# Query tokens per group below which the groups' re-reads of their keys outweigh what they
# skip (16-token groups: 0.5-0.8x forward + backward on the CPU at any batch).
MIN_GROUP_QUERIES = 32


def _runs(row: list[bool]) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of True in a list of bools."""
    runs, start = [], None
    for i, visible in enumerate(row + [False]):
        if visible and start is None:
            start = i
        elif not visible and start is not None:
            runs.append((start, i))
            start = None
    return runs


def query_groups(layout: AttentionLayout) -> tuple[QueryGroup, ...]:
    """The layout's query groups in query order (memoised on the layout; host-side ints)."""
    def compute():
        s = layout.tokens_per_frame
        rows = layout.frame_mask().tolist()
        groups, first = [], 0
        for f in range(1, len(rows) + 1):
            if f < len(rows) and rows[f] == rows[first]:
                continue
            keys = tuple((start * s, end * s) for start, end in _runs(rows[first]))
            groups.append(QueryGroup((first * s, f * s), keys))
            first = f
        return tuple(groups)
    return layout._memo("query groups", compute)


def use_groups(layout: AttentionLayout, q: torch.Tensor) -> bool:
    """Whether `attention_grouped` beats the dense-mask SDPA for q [B, Lq, H, D] (see the module
    docstring): one group always does (no mask, fewer keys); several do when their queries
    are large enough and the pairs they skip pay for the extra calls."""
    groups = query_groups(layout)
    if not any(group.keys for group in groups):
        return False                # all zeros; the masked call keeps k and v in the graph
    if len(groups) == 1:
        return True
    if layout.num_queries < MIN_GROUP_QUERIES * len(groups):
        return False
    batch, _, heads, head_dim = q.shape
    skipped = layout.num_queries * layout.num_keys - sum(g.num_queries * g.num_keys
                                                         for g in groups)
    per_call = MACS_PER_EXTRA_CALL.get(q.device.type, MACS_PER_EXTRA_CALL["cuda"])
    return batch * heads * head_dim * skipped >= (len(groups) - 1) * per_call


def _visible(x: torch.Tensor, runs: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The key tokens of `runs` of x [B, Lk, H, D]: a view for one run, a copy for several."""
    parts = [x[:, start:end] for start, end in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class _GatherKeys(torch.autograd.Function):
    """x [B, Lk, H, D] -> the visible keys of every group, as `_visible` gives them.

    Autograd through plain slices would allocate a zero-filled [B, Lk, H, D] gradient per
    group and sum them all; this backward fills one and adds each group's gradient into the
    runs it came from."""

    @staticmethod
    def forward(ctx, x, key_runs):
        ctx.key_runs, ctx.shape = key_runs, x.shape
        return tuple(_visible(x, runs) for runs in key_runs)

    @staticmethod
    def backward(ctx, *grads):
        dx = grads[0].new_zeros(ctx.shape)
        for runs, grad in zip(ctx.key_runs, grads):
            offset = 0
            for start, end in runs:
                dx[:, start:end] += grad[:, offset:offset + end - start]
                offset += end - start
        return dx, None


def attention_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      layout: AttentionLayout) -> torch.Tensor:
    """q [B, Lq, H, D], k and v [B, Lk, H, D] -> [B, Lq, H, D]; scale 1/sqrt(D).

    Exact masked attention as one unmasked SDPA per query group (see the module docstring).
    A query with no visible key returns zeros (never NaN); when no query sees any key the
    output is a constant, with no gradient path to k and v."""
    groups = query_groups(layout)
    key_runs = tuple(group.keys for group in groups if group.keys)
    keys = iter(_GatherKeys.apply(k, key_runs) if key_runs else ())
    values = iter(_GatherKeys.apply(v, key_runs) if key_runs else ())
    outs = []
    for group, q_group in zip(groups, q.split([g.num_queries for g in groups], dim=1)):
        if not group.keys:
            outs.append(q_group.new_zeros(q_group.shape[:-1] + v.shape[-1:]))
            continue
        out = F.scaled_dot_product_attention(q_group.transpose(1, 2),
                                             next(keys).transpose(1, 2),
                                             next(values).transpose(1, 2))
        outs.append(out.transpose(1, 2))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
