"""Active health probes: each backend (each engine pod of a `discovery: dns` backend) on its own
interval with jitter, at its engine's health path.

vLLM and our seq2seq worker answer `GET /health`; llama.cpp's server has none, so it is probed at
`GET /docs` (see `gateway.backends.engines`). A failed probe takes the backend out of routing
until a probe passes again. Each backend has its own probe loop, so one slow backend (or a slow DNS
name) never delays the verdict on the others.

A backend whose first probe fails is logged once, with its URL and why (at start-up: a wrong port, a
Kubernetes name that does not resolve here); after that only its changes are.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
from collections.abc import Callable
from urllib.parse import urlsplit

from gateway.backends.upstream import OpenAIUpstream, UpstreamUnavailable
from gateway.observability.metrics import Metrics
from gateway.routing.fleet import Fleet
from gateway.snapshot import Snapshot

log = logging.getLogger("gateway.health")

# Lookups of host names run in the shared thread pool; cap how many probes may wait on DNS at once,
# so a burst of slow lookups cannot starve the pool (or hold up a clean exit).
_PARALLEL_DNS_PROBES = 4


class Prober:
    def __init__(self, current: Callable[[], Snapshot], fleet: Fleet, metrics: Metrics, interval_s: float) -> None:
        self._current = current
        self._fleet = fleet
        self._metrics = metrics
        self._interval_s = interval_s
        self._dns_slots = asyncio.Semaphore(_PARALLEL_DNS_PROBES)
        self._loops: dict[str, asyncio.Task] = {}
        self._retiring: set[str] = set()  # gone upstreams whose state and series are dropped once idle

    async def run(self) -> None:
        """Keep one probe loop per backend of the current snapshot (reloads add and remove backends)."""
        try:
            while True:
                upstreams = self._current().upstreams
                for backend_id in self._loops.keys() - upstreams.keys():
                    self._loops.pop(backend_id).cancel()
                    self._retiring.add(backend_id)
                self._retire(upstreams)
                for backend_id, upstream in upstreams.items():
                    if backend_id not in self._loops:
                        self._loops[backend_id] = asyncio.create_task(self._probe_forever(backend_id))
                await asyncio.sleep(self._interval_s)
        finally:
            for task in self._loops.values():
                task.cancel()
            for task in self._loops.values():
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _retire(self, upstreams) -> None:
        """Forget upstreams that left the configuration or the DNS answer (pods of a rollout), once no
        request is in flight to them: their health state and metric series would otherwise pile up."""
        for backend_id in list(self._retiring):
            if backend_id in upstreams:  # back (a pod that came back at the same address)
                self._retiring.discard(backend_id)
            elif self._fleet.state(backend_id).outstanding == 0:
                self._fleet.states.pop(backend_id, None)
                self._metrics.forget_backend(backend_id)
                self._retiring.discard(backend_id)

    async def _probe_forever(self, backend_id: str) -> None:
        while True:
            upstream = self._current().upstreams.get(backend_id)
            if upstream is None:
                return
            try:
                self._record(upstream, await self._probe(upstream))
            except Exception:  # a probe must never kill its loop
                log.exception("health probe of %s failed", backend_id)
            await asyncio.sleep(self._interval_s * random.uniform(0.8, 1.2))

    async def _probe(self, upstream: OpenAIUpstream) -> UpstreamUnavailable | None:
        if _needs_dns(upstream.backend.base_url):
            async with self._dns_slots:
                return await upstream.probe()
        return await upstream.probe()

    def _record(self, upstream: OpenAIUpstream, failure: UpstreamUnavailable | None) -> None:
        state = self._fleet.state(upstream.id)
        first, was_healthy = state.last_probe is None, state.healthy
        self._fleet.probed(upstream.id, failure)
        if failure is not None and (first or was_healthy):
            log.warning("backend %s (model %s) at %s fails its health probe: %s", upstream.id, upstream.model_id,
                        upstream.backend.base_url, failure.reason)
        elif failure is None and not first and not was_healthy:
            log.warning("backend %s (model %s) at %s is healthy again", upstream.id, upstream.model_id,
                        upstream.backend.base_url)
        self._metrics.backend_up.labels(upstream.id).set(0 if failure else 1)


def _needs_dns(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False
