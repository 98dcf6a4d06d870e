"""The shared causal DiT (Wan2.1 architecture), its KV cache, and generation with it."""

from .config import DiTConfig
from .dit import CausalDiT
from .kv_cache import KVCache

__all__ = ["DiTConfig", "CausalDiT", "KVCache"]
