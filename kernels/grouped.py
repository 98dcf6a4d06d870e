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
runs through the slices and concatenations; the key gather has its own backward, which adds
every group's key gradient into one buffer.

The plan is computed once per layout from the host-side frame mask (ints on the CPU): a call
makes no host-device synchronisation.

When it pays (`use_groups`): every extra SDPA call has a fixed cost, every group re-reads
(and in the backward re-writes) its visible keys, and keys gathered from several runs are
copied, so small groups over tiny sequences are slower than one masked call. The rule weighs
those costs against the skipped pairs with constants fitted to CPU measurements (below;
bench/attention.py, bench/RESULTS.md).
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


# The grouped path's costs in multiply-adds of attention per batch x head x head-dim element
# (the unit of the pairs it skips), forward + backward (the stricter case), fitted to 96
# interleaved CPU measurements of toy-sized block-causal, windowed, teacher-forcing and
# cached layouts (one core; fit: 4.4e5 per call, 29 per re-read key, 38 per copied key).
# One more call (an SDPA call, or the key gather). CUDA: an estimate, not a measurement:
# ~10 us of kernel launches at ~10 T multiply-adds/s in fp32 (the torch path's GPU dtype).
MACS_PER_EXTRA_CALL = {"cpu": 5e5, "cuda": 1e8}
# A key token read by one more group than the single masked call reads it (SDPA loads it,
# and its backward writes a gradient that the gather adds back).
MACS_PER_REREAD_KEY = 32
# A key token copied for a group with several key runs (k and v, and the gradient back).
MACS_PER_COPIED_KEY = 32


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


def _group_costs(layout: AttentionLayout) -> tuple[int, int, int, int]:
    """(extra calls, skipped pairs, re-read key tokens, copied key tokens) of the grouped path
    against one masked SDPA call: a call per group beyond the first, plus the key gather
    unless one group sees one key run (a plain slice); every pair outside the groups; the
    key tokens all groups read beyond one pass over the keys (negative when a single group
    skips keys); the keys of groups with several runs."""
    def compute():
        groups = query_groups(layout)
        multi_run = [g for g in groups if len(g.keys) > 1]
        gathers = len(groups) > 1 or bool(multi_run)
        visible = sum(g.num_queries * g.num_keys for g in groups)
        return (len(groups) - 1 + gathers, layout.num_queries * layout.num_keys - visible,
                sum(g.num_keys for g in groups) - layout.num_keys,
                sum(g.num_keys for g in multi_run))
    return layout._memo("group costs", compute)


def use_groups(layout: AttentionLayout, q: torch.Tensor) -> bool:
    """Whether `attention_grouped` beats the dense-mask SDPA for q [B, Lq, H, D]: when the pairs
    it skips pay for its extra calls, key re-reads and key copies (see the constants)."""
    groups = query_groups(layout)
    if not any(group.keys for group in groups):
        return False                # all zeros; the masked call keeps k and v in the graph
    extra_calls, skipped, reread, copied = _group_costs(layout)
    batch, _, heads, head_dim = q.shape
    per_call = MACS_PER_EXTRA_CALL.get(q.device.type, MACS_PER_EXTRA_CALL["cuda"])
    net = skipped - MACS_PER_REREAD_KEY * reread - MACS_PER_COPIED_KEY * copied
    return batch * heads * head_dim * net >= extra_calls * per_call


def _visible(x: torch.Tensor, runs: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The key tokens of `runs` of x [B, H, Lk, D]: a view for one run, a copy for several."""
    parts = [x[:, :, start:end] for start, end in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


class _GatherKeys(torch.autograd.Function):
    """x [B, H, Lk, D] -> the visible keys of every group, as `_visible` gives them.

    Autograd through plain slices would allocate a zero-filled [B, H, Lk, D] gradient per
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
                dx[:, :, start:end] += grad[:, :, offset:offset + end - start]
                offset += end - start
        return dx, None


def attention_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      layout: AttentionLayout) -> torch.Tensor:
    """q [B, Lq, H, D], k and v [B, Lk, H, D] -> [B, Lq, H, D]; scale 1/sqrt(D).

    Exact masked attention as one unmasked SDPA per query group (see the module docstring).
    A query with no visible key returns zeros (never NaN); when no query sees any key the
    output is a constant, with no gradient path to k and v. Computed heads first ([B, H, L,
    D], SDPA's layout), so the groups' outputs are contiguous blocks of the result."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    groups = query_groups(layout)
    if len(groups) == 1 and len(groups[0].keys) == 1:     # one slice of the keys: a view
        (start, end), = groups[0].keys
        return F.scaled_dot_product_attention(q, k[:, :, start:end],
                                              v[:, :, start:end]).transpose(1, 2)
    key_runs = tuple(group.keys for group in groups if group.keys)
    keys = iter(_GatherKeys.apply(k, key_runs) if key_runs else ())
    values = iter(_GatherKeys.apply(v, key_runs) if key_runs else ())
    outs = []
    for group, q_group in zip(groups, q.split([g.num_queries for g in groups], dim=2)):
        if group.keys:
            outs.append(F.scaled_dot_product_attention(q_group, next(keys), next(values)))
        else:
            outs.append(q_group.new_zeros(q_group.shape[:-1] + v.shape[-1:]))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2)
