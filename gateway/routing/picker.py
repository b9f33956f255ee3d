"""Choose the order in which a request tries a model's backends.

Primaries (GPU engines) first, rotated round-robin so load spreads across replicas; CPU fallbacks only
after every primary. [4/5] replaces the rotation with filters -> scorers -> picker.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from gateway.registry.schema import Backend, Role

_turn = itertools.count()


def backends_in_try_order(backends: Sequence[Backend]) -> list[Backend]:
    primaries = [b for b in backends if b.role is Role.PRIMARY]
    fallbacks = [b for b in backends if b.role is Role.FALLBACK]
    if len(primaries) > 1:
        start = next(_turn) % len(primaries)
        primaries = primaries[start:] + primaries[:start]
    return primaries + fallbacks
