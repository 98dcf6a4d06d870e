"""Torch reference attention: SDPA with the layout's boolean mask (no mask when dense).

The reference every kernel is tested against, and the torch backend's choice for layouts
too small for `grouped.attention_grouped` to pay (see `grouped.use_groups`). It builds the
[Lq, Lk] token mask (memoised per layout and device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import AttentionLayout


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        layout: AttentionLayout) -> torch.Tensor:
    """q [B, Lq, H, D], k and v [B, Lk, H, D] -> [B, Lq, H, D]; scale 1/sqrt(D).

    A query row with no visible key returns zeros (never NaN)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if layout.is_dense():
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.token_mask(q.device))
        empty_rows = layout.empty_query_rows(q.device)      # host-side: no device sync per call
        if empty_rows is not None:
            out = out.masked_fill(empty_rows[None, None, :, None], 0.0)
    return out.transpose(1, 2)
