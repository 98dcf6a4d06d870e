"""Data: video files (video), preprocessing to latent shards (preprocess), the sample schema
(schema), shard datasets (shards), prompts, ODE pairs (ode_pairs) and the toy world (toyworld)."""
