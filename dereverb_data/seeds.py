"""Per-item random generators derived from hashes, never from a shared global stream.

Every random choice in a build is drawn from a generator seeded by a hash of (manifest seed,
what is being drawn, which item). The result does not depend on the order in which items are
processed, the number of workers, or which items a resumed build redoes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np


def derive_seed(*parts: Any) -> int:
    """A 64-bit seed from a stable hash of the parts (str/int/float/tuples)."""
    payload = json.dumps(parts, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "little")


def rng_for(*parts: Any) -> np.random.Generator:
    return np.random.default_rng(derive_seed(*parts))


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of a JSON-serialisable object, independent of key order."""
    payload = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(payload).hexdigest()[:length]
