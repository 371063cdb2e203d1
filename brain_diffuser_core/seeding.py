"""Per-item seeds, so that one reconstruction reproduces on its own, whatever loop it ran in."""
from __future__ import annotations

import hashlib

__all__ = ["seed_for"]


def seed_for(*keys: object, base_seed: int = 0) -> int:
    """A stable 31-bit seed derived from ``keys`` (e.g. ``("trial", image_id)``) and ``base_seed``.

    Independent of Python's hash randomisation and of the position of the item in any batch.
    """
    text = "|".join([str(int(base_seed))] + [repr(k) for k in keys])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF
