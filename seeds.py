"""Seeds of forcelab's random streams: one mixer, and names instead of numbers.

    mix_seed(seed, position, step)              # a 63-bit seed from integers
    stream_seed(seed, "rollout_noise", 17)      # the seed of a NAMED stream at integers

A stream is named after what it draws ("exit_step", "rollout_noise", "lora/critic"); its name
is hashed into the seed, so two pieces of code share random numbers only when they use the
same name on purpose - no table of reserved numbers to read before adding a stream.
"""

from __future__ import annotations

import hashlib

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0xD6E8FEB86659FD93)
MASK = (1 << 63) - 1            # seeds are non-negative 63-bit integers (torch's manual_seed range)
_NAME_BYTES = 8


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, position, draw ...): distinct parts, distinct streams."""
    key = 0
    for i, p in enumerate(parts):
        key = (key ^ (int(p) * _MIX[i % len(_MIX)] + i)) * _MIX[(i + 1) % len(_MIX)] & MASK
    return key


def name_key(name: str) -> int:
    """A stream name as a 63-bit integer (a digest: the same in every process and run)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"a random stream is named by a non-empty string, got {name!r}")
    digest = hashlib.blake2b(name.encode(), digest_size=_NAME_BYTES).digest()
    return int.from_bytes(digest, "little") & MASK


def stream_seed(seed: int, name: str, *parts: int) -> int:
    """The seed of stream `name` of the run seeded `seed` at `parts` (a sample position, a step ...)."""
    return mix_seed(seed, name_key(name), *parts)
