"""`GET /admin/backends`: what routing knows of each backend right now (each engine pod of a
`discovery: dns` backend is a row of its own: `id` is `<backend>@<address>`, `backend` the registry's id)."""

from __future__ import annotations

import time


def backend_report(state) -> list[dict]:  # gateway.pipeline.GatewayState
    now = time.monotonic()
    rows = []
    for upstream in state.snapshot.upstreams.values():
        backend = upstream.backend
        health = state.fleet.state(backend.id)
        ejected_for = max(0.0, health.ejected_until - now) if health.ejected_until else 0.0
        rows.append({
            "id": backend.id, "backend": upstream.name, "address": upstream.address or None,
            "model": upstream.served_model_name, "engine": backend.engine.value,
            "role": backend.role.value, "url": backend.base_url, "healthy": health.healthy,
            "ejected": state.fleet.is_ejected(backend.id), "ejected_for_s": round(ejected_for, 1),
            "ejections": health.ejections, "consecutive_errors": health.consecutive_errors,
            "outstanding": health.outstanding, "max_concurrency": backend.max_concurrency,
        })
    return rows
