"""The ASGI application: load the configuration at start-up, share one upstream pool, mount routes.

The generation routes are plain ASGI (`gateway.api.generation`); everything else is FastAPI."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp

from gateway.admin import reload_config
from gateway.api.errors import install_error_handlers
from gateway.api.generation import GenerationRoutes
from gateway.api.request_context import RequestContextMiddleware
from gateway.api.responses import router as responses_router
from gateway.api.routes import router
from gateway.backends.upstream import make_http_client
from gateway.observability.audit import AuditTrail
from gateway.observability.metrics import Metrics
from gateway.lifecycle import settle_garbage_collector
from gateway.pipeline import GatewayState
from gateway.responses.memory import MemoryResponseStore
from gateway.responses.retention import purge_periodically
from gateway.routing.budget import RetryBudget
from gateway.routing.fleet import Fleet, OutlierPolicy
from gateway.routing.health import Prober
from gateway.routing.picker import RoutingPolicy
from gateway.settings import Settings, get_settings
from gateway.snapshot import load_snapshot
from gateway.tenancy.auth import warn_open_access
from gateway.tenancy.ratelimit import make_rate_limiter
from gateway.usage.counters import UsageCounters
from gateway.usage.quota import make_quotas


def create_app(settings: Settings | None = None) -> ASGIApp:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with make_http_client(settings) as client:
            state = _build_state(settings, client)
            app.state.created = int(time.time())
            app.state.gateway = state
            _reload_on_sighup(state)
            settle_garbage_collector()
            prober = asyncio.create_task(Prober(lambda: state.snapshot, state.fleet, state.metrics,
                                                settings.health_probe_interval_s).run())
            purger = asyncio.create_task(purge_periodically(state.responses, settings.responses_purge_interval_s))
            try:
                yield
            finally:
                try:
                    asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
                    for task in (prober, purger):
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                    await state.limiter.close()
                    await state.quotas.close()
                    await state.usage.close()
                finally:
                    # After the drain: every record of a finished request is written (and fsynced) before
                    # exit; failing writes are retried for at most the flush timeout, off the event loop.
                    await asyncio.to_thread(state.audit.close, settings.audit_flush_timeout_s)

    app = FastAPI(title="LLM gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(responses_router)
    # Outermost: request id + overhead headers and the access log, for every route alike.
    return RequestContextMiddleware(GenerationRoutes(app))


def _build_state(settings: Settings, client) -> GatewayState:
    snapshot = load_snapshot(settings, client)  # an invalid file stops start-up, by design
    if snapshot.tenants is None:
        warn_open_access()
    metrics = Metrics()
    fleet = Fleet(OutlierPolicy(settings.outlier_consecutive_errors, settings.outlier_base_cooldown_s),
                  on_eject=lambda backend_id: metrics.ejections.labels(backend_id).inc())
    audit = AuditTrail(settings.audit_sink, max_pending=settings.audit_max_pending,
                       close_timeout_s=settings.audit_flush_timeout_s)
    metrics.watch_audit(audit)
    return GatewayState(
        settings, client, snapshot,
        limiter=make_rate_limiter(settings.redis_url, fail_closed=settings.ratelimit_fail_closed),
        audit=audit,
        quotas=make_quotas(settings.redis_url, fail_closed=settings.ratelimit_fail_closed),
        usage=UsageCounters(settings.redis_url),
        metrics=metrics,
        fleet=fleet,
        budget=RetryBudget(ratio=settings.retry_budget_ratio),
        routing=RoutingPolicy(settings.prefix_affinity, settings.session_affinity, settings.affinity_load_factor),
        responses=MemoryResponseStore(settings.responses_memory_capacity),
    )


def _reload_on_sighup(state: GatewayState) -> None:
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task] = set()

    def on_sighup() -> None:
        state.audit.reopen()  # logrotate's postrotate: later records go to a new file at the path
        task = loop.create_task(reload_config(state))
        pending.add(task)
        task.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
