"""What routing knows of each backend right now: `GET /admin/backends`, a model's availability in
`/v1/models`, and why none of a model's backends may be tried (the 503). An engine pod of a
`discovery: dns` backend is a backend of its own here: `id` is `<backend>@<address>`."""

from __future__ import annotations

import time
from collections.abc import Sequence

from gateway.backends.upstream import for_how_long, looks_lasting
from gateway.errors import BackendFailure
from gateway.registry.schema import Backend
from gateway.routing.fleet import Fleet


def backend_report(state) -> list[dict]:  # gateway.pipeline.GatewayState
    now = time.monotonic()
    rows = []
    for upstream in state.snapshot.upstreams.values():
        backend = upstream.backend
        health = state.fleet.state(backend.id)
        ejected_for = max(0.0, health.ejected_until - now) if health.ejected_until else 0.0
        probes = state.fleet.probe_verdict(backend.id)
        rows.append({
            # `model` is the id clients send; `served_model_name` what the gateway sends the engine.
            "id": backend.id, "backend": upstream.name, "address": upstream.address or None,
            "model": upstream.model_id, "served_model_name": upstream.served_model_name,
            "engine": backend.engine.value, "role": backend.role.value, "url": backend.base_url,
            "healthy": health.healthy, "probe_failure": health.probe_failure.reason if health.probe_failure else None,
            "failing_for_s": None if probes is None else round(probes.failing_for_s, 1),
            "ejected": state.fleet.is_ejected(backend.id), "ejected_for_s": round(ejected_for, 1),
            "ejections": health.ejections, "consecutive_errors": health.consecutive_errors,
            "outstanding": health.outstanding, "max_concurrency": backend.max_concurrency,
        })
    return rows


def availability(backends: Sequence[Backend], fleet: Fleet) -> str:
    """A model's state for `/v1/models`: `no_backends` (the registry configures none here), `ready` (a
    backend passed its last health probe), `unreachable` (every backend's last probe failed), or
    `unknown` (not probed yet, just after start-up or a reload)."""
    if not backends:
        return "no_backends"
    states = [fleet.state(backend.id) for backend in backends]
    if any(state.healthy and state.last_probe is not None for state in states):
        return "ready"
    if all(state.last_probe is not None for state in states):
        return "unreachable"
    return "unknown"


def unusable_backends(backends: Sequence[Backend], fleet: Fleet, lasting_after_s: float) -> list[BackendFailure]:
    """Why each of a model's backends is out of routing (ejected, or failing its probes)."""
    failures = []
    for backend in backends:
        state = fleet.state(backend.id)
        probes = fleet.probe_verdict(backend.id)
        reasons = []
        if fleet.is_ejected(backend.id):
            reasons.append(f"ejected after {state.consecutive_errors} failed requests in a row")
        if probes is not None:
            reasons.append(f"its health probe fails: {probes.failure.reason} ({for_how_long(probes.failing_for_s)})")
        lasting = probes is not None and looks_lasting(probes.failure.kind, probes, lasting_after_s)
        failures.append(BackendFailure(backend.id, backend.base_url, "; ".join(reasons) or "not usable right now",
                                       lasting))
    return failures


def no_ready_pods(backends: Sequence[Backend]) -> list[BackendFailure]:
    """A model whose backends name headless Services that list no pod right now (none ready, or the
    Service does not exist): each is named, and none is waited for as if it might answer in a moment."""
    return [BackendFailure(backend.id, backend.base_url, "no engine pod is ready behind this name (DNS lists none)")
            for backend in backends]
