"""Console commands that belong to no other package: `forcelab info` and `forcelab convert`
(the model's shapes and its checkpoint formats; the weight I/O itself is models/checkpoint.py)."""
