"""HTTP routes. Thin on purpose: each hands the request to `gateway.pipeline` or reads app state."""

from __future__ import annotations

from fastapi import APIRouter, Header, Request
from fastapi.responses import ORJSONResponse
from starlette.responses import Response

from gateway import pipeline
from gateway.api.models import model_card, model_list
from gateway.errors import model_not_found
from gateway.tenancy.auth import authenticate

router = APIRouter()


def _state(request: Request) -> pipeline.GatewayState:
    return request.app.state.gateway


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, authorization: str | None = Header(None)) -> Response:
    return await pipeline.serve(_state(request), pipeline.CHAT, authorization, await request.body())


@router.post("/v1/completions")
async def completions(request: Request, authorization: str | None = Header(None)) -> Response:
    return await pipeline.serve(_state(request), pipeline.COMPLETIONS, authorization, await request.body())


@router.get("/v1/models")
async def list_models(request: Request, authorization: str | None = Header(None)) -> ORJSONResponse:
    authenticate(authorization)
    state = _state(request)
    return ORJSONResponse(model_list(state.registry, request.app.state.created).model_dump())


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request, authorization: str | None = Header(None)) -> ORJSONResponse:
    authenticate(authorization)
    state = _state(request)
    model = state.registry.model(model_id)
    if model is None:
        raise model_not_found(model_id)
    return ORJSONResponse(model_card(state.registry, model, request.app.state.created).model_dump())


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> ORJSONResponse:
    state = getattr(request.app.state, "gateway", None)
    if state is None:
        return ORJSONResponse({"status": "starting"}, status_code=503)
    return ORJSONResponse({"status": "ready", "models": len(state.registry.models)})
