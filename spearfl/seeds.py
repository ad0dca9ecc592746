"""Seeds for every random choice, derived from (run seed, round, client, purpose) by hashing.

Adding the parts (seed + round + client, as the reference does) collides: round 1 of
client 2 and round 2 of client 1 draw the same numbers. Hashing a canonical encoding of
the whole tuple keeps every (round, client, purpose) stream apart, and the value does not
depend on the Python process (no `hash()`, which is salted per process for strings).

Server-side draws that belong to no client (e.g. which clients a round samples) use
`SERVER_CLIENT_ID`.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

SERVER_CLIENT_ID = -1
_SEED_MASK = (1 << 63) - 1  # 63 bits: non-negative in a signed 64-bit integer, accepted by torch and numpy


def derive_seed(run_seed: int, round_index: int, client_id: int, purpose: str) -> int:
    """Seed in [0, 2**63) for one random stream; equal inputs give equal seeds in every process."""
    for name, value in (("run_seed", run_seed), ("round_index", round_index), ("client_id", client_id)):
        # bool is an int subclass; True would silently encode as the JSON literal `true`
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if not isinstance(purpose, str) or not purpose:
        raise TypeError(f"purpose must be a non-empty str, got {purpose!r}")
    # A JSON list is unambiguous: no separator inside `purpose` can make two tuples encode alike.
    encoding = json.dumps(["spearfl-seed-v1", run_seed, round_index, client_id, purpose], separators=(",", ":"))
    digest = hashlib.sha256(encoding.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & _SEED_MASK


def numpy_generator(seed: int) -> np.random.Generator:
    """NumPy generator (PCG64) seeded with `seed`."""
    return np.random.default_rng(seed)
