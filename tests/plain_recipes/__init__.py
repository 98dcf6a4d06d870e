"""Independent, deliberately plain re-implementations of one training step of every recipe,
written from the papers' algorithms (loops over chunks and steps; no rollout engine, no KV
cache, no trainer, no recipe module, no forcelab loss or schedule code; only the DiT forward).
The recipe tests compare forcelab's gradients against these."""
