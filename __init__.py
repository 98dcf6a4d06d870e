"""forcelab: train and distill causal (autoregressive, streaming) video diffusion models.

One causal DiT, one rollout engine, every recipe."""

__version__ = "0.1.0"
