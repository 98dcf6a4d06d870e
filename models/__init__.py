"""The shared causal DiT (Wan2.1 architecture), its KV cache, the sampling schedule and plans, the
rollout engine, the encoders and checkpoint I/O. Generation (prompts -> videos) is generate/."""

from .config import DiTConfig
from .dit import CausalDiT
from .kv_cache import KVCache

__all__ = ["DiTConfig", "CausalDiT", "KVCache"]
