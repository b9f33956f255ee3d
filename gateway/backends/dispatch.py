"""Send one prepared call to the first backend that answers, and shape the answer for the client.

Backends are tried in the order routing chose; a backend that cannot be reached, or answers 502/503/504
before any byte went to the client, is skipped for the next one. Nothing is retried after the first
byte reached the client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import orjson
from starlette.responses import Response, StreamingResponse

from gateway.backends.relay import UsageCounter, relay_stream, upstream_error
from gateway.backends.translate import ChatFromCompletion, Passthrough, Translator
from gateway.backends.upstream import OpenAIUpstream, UpstreamUnavailable
from gateway.errors import no_backend_available
from gateway.prompts.prepare import Reply, UpstreamCall

_RETRYABLE = (502, 503, 504)


@dataclass
class Outcome:
    """What the caller learns when the answer is complete (for rate-limit reconciliation, metrics)."""

    total_tokens: int | None = None  # from the engine's usage, when the answer carried one
    streamed_events: int = 0  # SSE events relayed (about one per generated token)
    backend_id: str | None = None
    on_done: list[Callable[["Outcome"], Awaitable[None]]] = field(default_factory=list)

    async def done(self) -> None:
        callbacks, self.on_done = self.on_done, []
        for callback in callbacks:
            await callback(self)


async def dispatch(
    upstreams: list[OpenAIUpstream],
    call: UpstreamCall,
    requested: str,
    headers: dict[str, str],
    outcome: Outcome,
    retry_after_s: int,
) -> Response:
    stream = bool(call.payload.get("stream"))
    failures: list[str] = []
    for upstream in upstreams:
        call.payload["model"] = upstream.served_model_name
        try:
            response = await upstream.post(call.path, call.payload, stream=stream)
        except UpstreamUnavailable as exc:
            failures.append(str(exc))
            continue
        if response.status_code in _RETRYABLE:  # engine up but not serving: try the next one
            await response.aclose()
            failures.append(f"{upstream.id}: HTTP {response.status_code}")
            continue
        outcome.backend_id = upstream.id
        headers = {**headers, "x-gateway-backend": upstream.id}
        translator = _translator(call, upstream, requested)
        if stream:
            return await _stream_response(upstream, response, call, translator, requested, headers, outcome)
        return await _json_response(response, translator, headers, outcome)
    detail = "; ".join(failures) if failures else "the model has no backends configured"
    raise no_backend_available(requested, detail, retry_after_s)


def _translator(call: UpstreamCall, upstream: OpenAIUpstream, requested: str) -> Translator:
    if call.reply is Reply.CHAT_FROM_COMPLETION:
        return ChatFromCompletion(requested)
    return Passthrough(served=upstream.served_model_name, requested=requested)


async def _json_response(
    response: httpx.Response, translator: Translator, headers: dict[str, str], outcome: Outcome
) -> Response:
    if response.status_code != 200:
        raise upstream_error(response.status_code, response.content)
    if outcome.on_done:  # only parse what is only forwarded when someone needs the usage
        usage = orjson.loads(response.content).get("usage") or {}
        outcome.total_tokens = usage.get("total_tokens")
        await outcome.done()
    return Response(translator.body(response.content), media_type="application/json", headers=headers)


async def _stream_response(
    upstream: OpenAIUpstream,
    response: httpx.Response,
    call: UpstreamCall,
    translator: Translator,
    requested: str,
    headers: dict[str, str],
    outcome: Outcome,
) -> Response:
    if response.status_code != 200:
        body = await response.aread()
        await response.aclose()
        raise upstream_error(response.status_code, body)
    usage = None
    if _wants_usage(call.payload) and not upstream.profile.sends_stream_usage:
        usage = UsageCounter(count_prompt_tokens=lambda: _count_prompt(upstream, call))
    events = relay_stream(response, translator, requested, usage)
    return StreamingResponse(
        _finishing(events, outcome),
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
    )


async def _finishing(events: AsyncIterator[bytes], outcome: Outcome) -> AsyncIterator[bytes]:
    """Relay, then report the outcome, also when the client went away mid-stream."""
    sent = 0
    try:
        async for event in events:
            sent += 1
            yield event
    finally:
        outcome.streamed_events = sent
        await outcome.done()


def _wants_usage(payload: dict) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


async def _count_prompt(upstream: OpenAIUpstream, call: UpstreamCall) -> int:
    text = call.prompt_text or ""
    counted = await upstream.count_tokens(text) if text else None
    # Conservative estimate when the engine cannot tokenize: ~4 characters per token.
    return counted if counted is not None else max(1, len(text) // 4)
