"""The request path, composed in one place:

    request -> auth (tenant) -> policy -> prompt preparation -> routing -> backend -> response

Each step lives in its own package; this module only wires them in that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import httpx
from pydantic import BaseModel
from starlette.responses import Response, StreamingResponse

from gateway.api.protocol import ChatCompletionRequest, CompletionRequest
from gateway.api.validation import parse_body
from gateway.backends.relay import UsageCounter, relay_stream, upstream_error
from gateway.backends.translate import ChatFromCompletion, Passthrough, Translator
from gateway.backends.upstream import OpenAIUpstream, UpstreamUnavailable
from gateway.errors import GatewayError, model_not_found, no_backend_available
from gateway.policy.decide import decide
from gateway.prompts.context import ensure_prompt_fits
from gateway.prompts.prepare import Reply, UpstreamCall, prepare_chat, prepare_completion
from gateway.registry import Model, Registry
from gateway.routing.picker import backends_in_try_order
from gateway.settings import Settings
from gateway.tenancy.auth import authenticate


@dataclass
class GatewayState:
    settings: Settings
    registry: Registry
    client: httpx.AsyncClient
    upstreams: dict[str, OpenAIUpstream]


@dataclass(frozen=True)
class Endpoint:
    schema: type[BaseModel]
    prepare: Callable[[Model, dict[str, Any]], UpstreamCall]


CHAT = Endpoint(ChatCompletionRequest, prepare_chat)
COMPLETIONS = Endpoint(CompletionRequest, prepare_completion)


async def serve(state: GatewayState, endpoint: Endpoint, authorization: str | None, raw: bytes) -> Response:
    tenant = authenticate(authorization)
    body = parse_body(raw, endpoint.schema)
    model_id = body["model"]
    model = state.registry.model(model_id)
    if model is None:
        raise model_not_found(model_id)
    decision = decide(tenant, model)
    if not decision.allowed:
        raise GatewayError(403, decision.reason, type="permission_error", code=decision.rule)
    call = endpoint.prepare(model, body)
    upstreams = [state.upstreams[backend.id] for backend in backends_in_try_order(model.backends)]
    if upstreams:
        await ensure_prompt_fits(model, call, upstreams[0].count_tokens)
    return await _dispatch(state, upstreams, call, requested=model_id)


async def _dispatch(
    state: GatewayState, upstreams: list[OpenAIUpstream], call: UpstreamCall, requested: str
) -> Response:
    stream = bool(call.payload.get("stream"))
    failures: list[str] = []
    for upstream in upstreams:
        backend = upstream.backend
        call.payload["model"] = upstream.served_model_name
        try:
            response = await upstream.post(call.path, call.payload, stream=stream)
        except UpstreamUnavailable as exc:
            failures.append(str(exc))
            continue
        if response.status_code in (502, 503, 504):  # engine up but not serving: try the next one
            await response.aclose()
            failures.append(f"{backend.id}: HTTP {response.status_code}")
            continue
        translator = _translator(call, upstream, requested)
        headers = {"x-gateway-backend": backend.id}
        if stream:
            return await _stream_response(upstream, response, call, translator, requested, headers)
        return _json_response(response, translator, headers)
    detail = "; ".join(failures) if failures else "the model has no backends configured"
    raise no_backend_available(requested, detail, state.settings.retry_after_s)


def _translator(call: UpstreamCall, upstream: OpenAIUpstream, requested: str) -> Translator:
    if call.reply is Reply.CHAT_FROM_COMPLETION:
        return ChatFromCompletion(requested)
    return Passthrough(served=upstream.served_model_name, requested=requested)


def _json_response(response: httpx.Response, translator: Translator, headers: dict[str, str]) -> Response:
    if response.status_code != 200:
        raise upstream_error(response.status_code, response.content)
    return Response(translator.body(response.content), media_type="application/json", headers=headers)


async def _stream_response(
    upstream: OpenAIUpstream,
    response: httpx.Response,
    call: UpstreamCall,
    translator: Translator,
    requested: str,
    headers: dict[str, str],
) -> Response:
    if response.status_code != 200:
        body = await response.aread()
        await response.aclose()
        raise upstream_error(response.status_code, body)
    usage = None
    if _wants_usage(call.payload) and not upstream.profile.sends_stream_usage:
        usage = UsageCounter(count_prompt_tokens=lambda: _count_prompt(upstream, call))
    return StreamingResponse(
        relay_stream(response, translator, requested, usage),
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
    )


def _wants_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


async def _count_prompt(upstream: OpenAIUpstream, call: UpstreamCall) -> int:
    text = call.prompt_text or ""
    counted = await upstream.count_tokens(text) if text else None
    # Conservative estimate when the engine cannot tokenize: ~4 characters per token.
    return counted if counted is not None else max(1, len(text) // 4)
