"""Attention for forcelab: layouts (who sees whom) and the backends that compute it.

    from forcelab.kernels import attention, AttentionLayout
    layout = AttentionLayout.block_causal(frames=F, tokens_per_frame=S, chunk_frames=3)
    out = attention(q, k, v, layout)          # q, k, v: [B, L, H, D]
"""

from .dispatch import attention
from .layout import AttentionLayout

__all__ = ["attention", "AttentionLayout"]

from .rope import apply_rope, qk_norm_rope, rms_norm  # noqa: E402

__all__ += ["apply_rope", "qk_norm_rope", "rms_norm"]
