"""The ASGI application: load the configuration at start-up, share one upstream pool, mount routes.

The generation routes are plain ASGI (`gateway.api.generation`); everything else is FastAPI."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp

from gateway.admin import reload_config
from gateway.api import admin_views
from gateway.api.errors import install_error_handlers
from gateway.api.generation import GenerationRoutes
from gateway.api.request_context import RequestContextMiddleware
from gateway.api.admin_routes import router as admin_router
from gateway.api.responses import router as responses_router
from gateway.api.routes import router
from gateway.backends.discovery import Addresses, dns_resolver
from gateway.backends.upstream import make_http_client
from gateway.config_watch import watch_config
from gateway.console import mount_console
from gateway.observability.audit import AuditTrail
from gateway.observability.metrics import Metrics
from gateway.lifecycle import settle_garbage_collector
from gateway.pipeline import GatewayState
from gateway.routing.budget import RetryBudget
from gateway.routing.fleet import Fleet, OutlierPolicy
from gateway.routing.health import Prober
from gateway.routing.picker import RoutingPolicy
from gateway.settings import Settings, get_settings
from gateway.snapshot import load_snapshot
from gateway.tenancy.auth import warn_open_access
from gateway.admission.quota import make_quotas
from gateway.admission.ratelimit import make_rate_limiter
from gateway.store.migrate import SchemaTooNew
from gateway.store.store import Store
from gateway.usage.api import UsageApi
from gateway.usage.record import UsageRecorder

log = logging.getLogger("gateway.api")
QUOTA_SEED_RETRY_S = 5.0


def create_app(settings: Settings | None = None) -> ASGIApp:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The database first: migrations under their lock; a database that can't be reached only leaves
        # the store unhealthy (rows go to the spool); a malformed URL or a newer schema stops start-up.
        store = await _open_store(settings)
        try:
            async with make_http_client(settings) as client:
                addresses = Addresses(dns_resolver(settings.nameservers), settings.dns_refresh_s)
                state = _build_state(settings, client, store, addresses)
                app.state.created = int(time.time())
                app.state.gateway = state
                app.state.usage_api = UsageApi(settings, store, state.quotas, state.metrics)
                app.state.console_sessions = store.sessions  # shared by every replica, sign-out included
                _reload_on_sighup(state)
                await _first_lookup(state)
                settle_garbage_collector()
                tasks = [asyncio.create_task(Prober(lambda: state.snapshot, state.fleet, state.metrics,
                                                    settings.health_probe_interval_s).run()),
                         asyncio.create_task(addresses.run(lambda: state.snapshot.upstreams.hosts()))]
                if settings.config_watch_s:
                    tasks.append(asyncio.create_task(watch_config(state, settings.config_watch_s)))
                if not settings.redis_url:  # quotas in this process: from the ledger, not from zero
                    tasks.append(asyncio.create_task(_seed_local_quotas(state)))
                try:
                    yield
                finally:
                    try:
                        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
                        for task in tasks:
                            task.cancel()
                            with contextlib.suppress(asyncio.CancelledError):
                                await task
                        await state.limiter.close()
                        await state.quotas.close()
                    finally:
                        # After the drain: every record of a finished request is written (and fsynced)
                        # before exit; failing writes are retried for at most the flush timeout, off the
                        # event loop. Ledger rows and decisions: to the database, else to the spool.
                        try:
                            await store.close(settings.audit_flush_timeout_s)
                        finally:
                            await asyncio.to_thread(state.audit.close, settings.audit_flush_timeout_s)
        except BaseException:
            if not store.closed:
                await store.close(settings.audit_flush_timeout_s)
            raise

    app = FastAPI(title="LLM gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(admin_router)
    app.include_router(admin_views.router)
    mount_console(app, settings)  # /console: its own router, off the request path
    app.include_router(responses_router)
    # Outermost: request id + overhead headers and the access log, for every route alike.
    return RequestContextMiddleware(GenerationRoutes(app))


async def _first_lookup(state: GatewayState) -> None:
    """Find the engine pods before the first request (at most a few seconds; then the Service names
    stand in until the next refresh)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(3.0):
            await state.snapshot.upstreams.addresses.refresh(state.snapshot.upstreams.hosts())


async def _open_store(settings: Settings) -> Store:
    try:
        return await Store.open(settings)
    except SchemaTooNew as exc:
        log.error("refusing to start: %s", exc)  # a person must act: one line naming both revisions
        raise


def _build_state(settings: Settings, client, store: Store, addresses: Addresses | None = None) -> GatewayState:
    snapshot = load_snapshot(settings, client, addresses)  # an invalid file stops start-up, by design
    if snapshot.tenants is None:
        warn_open_access()
    metrics = Metrics(tenant_label=settings.metrics_tenant_label)
    fleet = Fleet(OutlierPolicy(settings.outlier_consecutive_errors, settings.outlier_base_cooldown_s),
                  on_eject=lambda backend_id: metrics.ejections.labels(backend_id).inc())
    audit = AuditTrail(settings.audit_sink, max_pending=settings.audit_max_pending,
                       close_timeout_s=settings.audit_flush_timeout_s)
    metrics.watch_audit(audit)
    metrics.watch_store(store)
    admit_unknown = settings.quota_outage_unknown_tenants == "admit"

    async def quota_used(tenant: str) -> tuple[int, int, int, int]:
        used = await store.period_usage(tenant)
        return used.day, used.day_used, used.month, used.month_used

    return GatewayState(
        settings, client, snapshot,
        limiter=make_rate_limiter(settings.redis_url, fail_closed=settings.ratelimit_fail_closed,
                                  admit_unknown_quotas=admit_unknown, quota_used=quota_used),
        audit=audit,
        store=store,
        usage=UsageRecorder(audit, store.ledger, metrics),
        quotas=make_quotas(settings.redis_url, fail_closed=settings.ratelimit_fail_closed,
                           ready=bool(settings.redis_url), admit_unready=admit_unknown),
        metrics=metrics,
        fleet=fleet,
        budget=RetryBudget(ratio=settings.retry_budget_ratio),
        routing=RoutingPolicy(settings.prefix_affinity, settings.session_affinity, settings.affinity_load_factor),
        responses=store.responses,  # the database's: a chain continues on any replica
    )


async def _seed_local_quotas(state: GatewayState, retry_s: float = QUOTA_SEED_RETRY_S) -> None:
    """Without Redis, this process's quota counts start from the ledger's use of this day and month (a
    restart must not hand out fresh quotas). Until the database answers, quota tenants are refused
    (GATEWAY_QUOTA_OUTAGE_UNKNOWN_TENANTS=admit: admitted from zero); retried until it does. The outage
    itself is the store's one log line; this says what it means for quotas, once."""
    said = False
    while True:
        try:
            used = await state.store.period_usage_all()
        except Exception:
            if not said:
                said = True
                log.warning("token quotas wait for the database: quota tenants are %s until it answers",
                            "admitted from zero" if state.settings.quota_outage_unknown_tenants == "admit"
                            else "refused (503)")
            await asyncio.sleep(retry_s)
            continue
        state.quotas.seed({tenant: (u.day, u.day_used, u.month, u.month_used) for tenant, u in used.items()})
        if said:
            log.warning("token quotas read from the database: quota tenants are admitted again")
        return


def _reload_on_sighup(state: GatewayState) -> None:
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task] = set()

    def on_sighup() -> None:
        state.audit.reopen()  # logrotate's postrotate: later records go to a new file at the path
        task = loop.create_task(reload_config(state))
        pending.add(task)
        task.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
