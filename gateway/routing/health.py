"""Active health probes: every backend, on an interval with jitter, at its engine's health path.

vLLM and our seq2seq worker answer `GET /health`; llama.cpp's server has none, so it is probed at
`GET /v1/models` (see `gateway.backends.engines`). A failed probe takes the backend out of routing
until a probe passes again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from gateway.observability.metrics import Metrics
from gateway.routing.fleet import Fleet
from gateway.snapshot import Snapshot

log = logging.getLogger("gateway.health")


# Probes at once, at most: each may need a DNS lookup in the shared thread pool, and a burst of slow
# lookups there would delay the requests' own connects (and a clean exit).
_PARALLEL_PROBES = 4


async def probe_once(snapshot: Snapshot, fleet: Fleet, metrics: Metrics) -> None:
    upstreams = list(snapshot.upstreams.values())
    slots = asyncio.Semaphore(_PARALLEL_PROBES)

    async def probe(upstream) -> bool:
        async with slots:
            return await upstream.is_healthy()

    results = await asyncio.gather(*(probe(upstream) for upstream in upstreams))
    for upstream, healthy in zip(upstreams, results):
        state = fleet.state(upstream.id)
        if state.healthy != healthy and state.last_probe is not None:
            log.warning("backend %s is %s", upstream.id, "healthy again" if healthy else "failing its health probe")
        state.healthy = healthy
        state.last_probe = asyncio.get_running_loop().time()
        metrics.backend_up.labels(upstream.id).set(1 if healthy else 0)


async def probe_forever(current: Callable[[], Snapshot], fleet: Fleet, metrics: Metrics, interval_s: float) -> None:
    while True:
        try:
            await probe_once(current(), fleet, metrics)
        except Exception:  # a probe round must never kill the prober
            log.exception("health probe round failed")
        await asyncio.sleep(interval_s * random.uniform(0.8, 1.2))
