"""HTTP routes besides generation (`gateway.api.generation`). Thin on purpose: each reads app state."""

from __future__ import annotations

from fastapi import APIRouter, Header, Request
from gateway.api.json import JSONResponse
from starlette.responses import Response

from gateway import pipeline
from gateway.admin import reload_config
from gateway.api.callers import request_caller
from gateway.api.models import model_card, visible_models
from gateway.errors import license_forbidden, model_not_found
from gateway.lifecycle import LIFECYCLE
from gateway.routing.report import availability, backend_report
from gateway.tenancy.auth import require_admin
from gateway.usage import api as usage_api

router = APIRouter()


def _state(request: Request) -> pipeline.GatewayState:
    return request.app.state.gateway


@router.get("/v1/models")
async def list_models(request: Request, authorization: str | None = Header(None)) -> JSONResponse:
    state = _state(request)
    snapshot = state.snapshot
    caller = request_caller(request, authorization)
    cards = [model_card(snapshot.registry, m, request.app.state.created,
                        availability(snapshot.upstreams.endpoints(m), state.fleet))  # engine pods, not Services
             for m in visible_models(snapshot.registry, caller.tenant)]
    return JSONResponse({"object": "list", "data": [card.model_dump() for card in cards]})


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request, authorization: str | None = Header(None)) -> JSONResponse:
    state = _state(request)
    snapshot = state.snapshot
    caller = request_caller(request, authorization)
    model = snapshot.registry.model(model_id)
    if model is None:
        raise snapshot.missing(model_id, caller.tenant)  # says so when this deployment does not run it
    decision = snapshot.decide(caller.tenant, model)
    if decision.hidden:
        raise model_not_found(model_id)  # a model hidden from the tenant looks exactly like a missing one
    if not decision.allowed:
        raise license_forbidden(decision.reason)  # as a chat with it would be: the 403 names the license
    card = model_card(snapshot.registry, model, request.app.state.created,
                      availability(snapshot.upstreams.endpoints(model), state.fleet))
    return JSONResponse(card.model_dump())


@router.get("/v1/organization/usage/completions")
async def usage_completions(request: Request, authorization: str | None = Header(None)) -> JSONResponse:
    state = _state(request)
    caller = request_caller(request, authorization)  # a key, or a console session (gateway/api/callers.py)
    api: usage_api.UsageApi = request.app.state.usage_api
    tenants = state.snapshot.tenants.tenants if state.snapshot.tenants is not None else {}
    return JSONResponse(await api.completions(tenants, caller, request.query_params))


@router.post("/admin/reload")
async def admin_reload(request: Request, authorization: str | None = Header(None)) -> JSONResponse:
    state = _state(request)
    require_admin(request_caller(request, authorization))
    result = await reload_config(state)
    return JSONResponse(result.body(), status_code=200 if result.ok else 400)


@router.get("/admin/backends")
async def admin_backends(request: Request, authorization: str | None = Header(None)) -> JSONResponse:
    state = _state(request)
    require_admin(request_caller(request, authorization))
    return JSONResponse({"data": backend_report(state)})


@router.get("/metrics")
async def metrics(request: Request, authorization: str | None = Header(None)) -> Response:
    state = _state(request)
    if not state.settings.metrics_public:  # tenant names, backends and licenses are not every caller's
        require_admin(request_caller(request, authorization))
    limiter_up = getattr(state.limiter, "redis_healthy", None)
    if limiter_up is not None:
        state.metrics.ratelimit_backend_up.set(1 if limiter_up else 0)
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


def _database(state: pipeline.GatewayState | None) -> str:
    """"ok", or "degraded" while the database can't be written (rows wait in the spool: requests go on;
    gateway_store_healthy says the same), or "unavailable" while even the spool can't be written."""
    if state is None:
        return "starting"
    store = state.store
    return "ok" if store.healthy else "degraded" if store.durable else "unavailable"


@router.get("/health")
async def health(request: Request) -> dict[str, str]:
    return {"status": "ok", "database": _database(getattr(request.app.state, "gateway", None))}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """503 only while starting or draining: a database outage degrades the records (spooled), not the
    answers, so a replica whose database is unreachable stays in rotation and says so."""
    state = getattr(request.app.state, "gateway", None)
    if state is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    if LIFECYCLE.draining:
        return JSONResponse({"status": "draining", "inflight": LIFECYCLE.inflight}, status_code=503)
    return JSONResponse({"status": "ready", "models": len(state.snapshot.registry.models),
                         "database": _database(state)})
