"""Choose the order in which a request tries a model's backends: filters -> scorers -> picker.

Filters drop backends that are unhealthy, ejected or at their `max_concurrency`. Scorers rank the rest:
least outstanding requests by power-of-two choices (default), optionally prefix affinity (the replica
whose prefix cache holds this prompt's start, unless it is much busier) and session affinity (the
request's `user`). Primaries (GPU engines) come first; CPU fallbacks only when no primary can serve.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.registry.schema import Backend, Role
from gateway.routing.fleet import Fleet


@dataclass(frozen=True)
class RoutingHints:
    prompt_prefix: str | None = None  # the rendered prompt's first N characters
    session: str | None = None  # the request's `user` field


@dataclass(frozen=True)
class RoutingPolicy:
    prefix_affinity: bool = False
    session_affinity: bool = False
    # Prefer the affine replica only while its load is at most this factor of the least loaded one's.
    affinity_load_factor: float = 2.0


def usable(backends: Sequence[Backend], fleet: Fleet, *, trust_probes: bool = True) -> list[Backend]:
    """The filters: healthy (unless probes are not trusted), not ejected, below max_concurrency."""
    result = []
    for backend in backends:
        state = fleet.state(backend.id)
        if (trust_probes and not state.healthy) or fleet.is_ejected(backend.id):
            continue
        if backend.max_concurrency is not None and state.outstanding >= backend.max_concurrency:
            continue
        result.append(backend)
    return result


def rank(candidates: list[Backend], fleet: Fleet, hints: RoutingHints, policy: RoutingPolicy,
         rng: random.Random = random.Random()) -> list[Backend]:
    """The scorers and the picker: first the chosen backend, then the others as retry candidates."""
    if len(candidates) <= 1:
        return list(candidates)
    load = {b.id: fleet.state(b.id).outstanding for b in candidates}
    first = _power_of_two(candidates, load, rng)
    affine = _affine(candidates, hints, policy)
    if affine is not None and load[affine.id] <= max(1, load[first.id]) * policy.affinity_load_factor:
        first = affine
    rest = sorted((b for b in candidates if b is not first), key=lambda b: load[b.id])
    return [first, *rest]


def backends_in_try_order(backends: Sequence[Backend], fleet: Fleet, hints: RoutingHints = RoutingHints(),
                          policy: RoutingPolicy = RoutingPolicy()) -> list[Backend]:
    primaries = [b for b in backends if b.role is Role.PRIMARY]
    fallbacks = [b for b in backends if b.role is Role.FALLBACK]
    order = rank(usable(primaries, fleet), fleet, hints, policy) + rank(usable(fallbacks, fleet), fleet, hints, policy)
    if order:
        return order
    # Panic mode (as Envoy's): when every backend fails its probe, the probes are more likely wrong
    # (a probe path blocked, an engine still warming up) than every engine down: try them anyway.
    return (rank(usable(primaries, fleet, trust_probes=False), fleet, hints, policy)
            + rank(usable(fallbacks, fleet, trust_probes=False), fleet, hints, policy))


def _power_of_two(candidates: list[Backend], load: dict[str, int], rng: random.Random) -> Backend:
    a, b = rng.sample(candidates, 2)
    return a if load[a.id] <= load[b.id] else b


def _affine(candidates: list[Backend], hints: RoutingHints, policy: RoutingPolicy) -> Backend | None:
    key = None
    if policy.session_affinity and hints.session:
        key = hints.session
    elif policy.prefix_affinity and hints.prompt_prefix:
        key = hints.prompt_prefix
    if key is None:
        return None
    # Rendezvous hashing: the same key keeps its replica when others come and go.
    return max(candidates, key=lambda b: zlib.crc32(f"{b.id}|{key}".encode()))
