"""Stored responses over HTTP: GET and DELETE `/v1/responses/{id}`, GET `/v1/responses/{id}/input_items`.
Thin: the caller's tenant scopes every lookup (gateway.responses.retrieval). `POST /v1/responses` is a
generation route (gateway.api.generation)."""

from __future__ import annotations

from fastapi import APIRouter, Header, Request

from gateway.api.callers import request_caller
from gateway.api.json import JSONResponse
from gateway.responses import retrieval

router = APIRouter()


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request, authorization: str | None = Header(None)) -> JSONResponse:
    state = request.app.state.gateway
    caller = request_caller(request, authorization)
    return JSONResponse(await retrieval.retrieve(state.responses, caller.tenant.name, response_id,
                                                 request.query_params))


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request,
                          authorization: str | None = Header(None)) -> JSONResponse:
    state = request.app.state.gateway
    caller = request_caller(request, authorization)
    return JSONResponse(await retrieval.delete(state.responses, caller.tenant.name, response_id,
                                               request.query_params))


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(response_id: str, request: Request,
                           authorization: str | None = Header(None)) -> JSONResponse:
    state = request.app.state.gateway
    caller = request_caller(request, authorization)
    return JSONResponse(await retrieval.input_items(state.responses, caller.tenant.name, response_id,
                                                    request.query_params))
