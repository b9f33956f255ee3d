"""Send one prepared call to the first backend that answers, and shape the answer for the client.

Backends are tried in the order routing chose. A backend that cannot be reached, times out before its
headers, or answers 502/503/504 is given up for the next one, at most `max_attempts` in all and only
while the retry budget allows. Nothing is retried once a byte went to the client.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import orjson
from starlette.responses import Response, StreamingResponse

from gateway.backends.relay import StreamWatch, UsageCounter, relay_stream, upstream_error
from gateway.backends.requests import EnginePayloads, Unsupported
from gateway.backends.translate import ChatFromCompletion, ChatWithRefusal, Passthrough, Translator
from gateway.backends.upstream import OpenAIUpstream, UpstreamResponse, UpstreamUnavailable
from gateway.errors import GatewayError, no_backend_available
from gateway.prompts.prepare import CHAT_PATH, Reply, UpstreamCall
from gateway.registry.schema import Role

_RETRYABLE = (502, 503, 504)


@dataclass
class Outcome:
    """What the caller learns when the answer is complete (rate limits, metrics, outlier detection)."""

    total_tokens: int | None = None  # from the engine's usage, when the answer carried one
    usage: dict | None = None
    watch: StreamWatch | None = None  # streams only
    backend_id: str | None = None
    retries: int = 0
    fell_back: bool = False
    on_done: list[Callable[["Outcome"], Awaitable[None]]] = field(default_factory=list)

    async def done(self) -> None:
        callbacks, self.on_done = self.on_done, []
        for callback in callbacks:
            await callback(self)


@dataclass
class Attempts:
    """The per-request side of retries; the shared budget decides whether one more try is allowed."""

    max_attempts: int
    may_retry: Callable[[], bool]
    started: Callable[[str], None]
    finished: Callable[[str, bool], None]
    waited: Callable[[float], None]  # time spent waiting on an engine (excluded from the gateway's overhead)


async def dispatch(upstreams: list[OpenAIUpstream], payloads: EnginePayloads, requested: str,
                   headers: dict[str, str], outcome: Outcome, attempts: Attempts, retry_after_s: int) -> Response:
    call = payloads.call
    stream = call.stream
    failures: list[str] = []
    refusal: Unsupported | None = None
    timed_out = False
    tried = 0
    for upstream in upstreams:
        body = payloads.body_for(upstream.backend.engine)
        if isinstance(body, Unsupported):  # this engine cannot take the request; another may
            refusal = refusal or body
            continue
        if tried >= attempts.max_attempts or (tried and not attempts.may_retry()):
            break
        outcome.retries = tried
        tried += 1
        attempts.started(upstream.id)
        sent = time.perf_counter()
        try:
            response = await upstream.post(call.path, {**body, "model": upstream.served_model_name}, stream=stream)
        except UpstreamUnavailable as exc:
            attempts.waited(time.perf_counter() - sent)
            attempts.finished(upstream.id, False)
            failures.append(str(exc))
            timed_out = timed_out or exc.timed_out
            continue
        except BaseException:
            attempts.finished(upstream.id, False)
            raise
        attempts.waited(time.perf_counter() - sent)
        if response.status in _RETRYABLE:  # engine up but not serving: try the next one
            response.close()
            attempts.finished(upstream.id, False)
            failures.append(f"{upstream.id}: HTTP {response.status}")
            continue
        outcome.backend_id = upstream.id
        outcome.fell_back = upstream.backend.role is Role.FALLBACK
        headers = {**headers, "x-gateway-backend": upstream.id}
        if outcome.fell_back:
            headers["x-gateway-fallback"] = "cpu"
        outcome.on_done.insert(0, _report_health(attempts, upstream.id))
        translator = _translator(call, upstream, requested)
        if stream:
            return await _stream_response(upstream, response, call, translator, requested, headers, outcome)
        return await _json_response(upstream, response, translator, headers, outcome)
    if not tried and refusal is not None:
        raise refusal.to_client_error(requested)
    if timed_out:
        raise GatewayError(504, f"No backend for `{requested}` answered in time ({'; '.join(failures)}).",
                           type="upstream_error", code="upstream_timeout")
    detail = "; ".join(failures) if failures else "no healthy backend"
    raise no_backend_available(requested, detail, retry_after_s)


def _report_health(attempts: Attempts, backend_id: str) -> Callable[[Outcome], Awaitable[None]]:
    async def report(outcome: Outcome) -> None:
        failed = outcome.watch is not None and outcome.watch.failure is not None
        attempts.finished(backend_id, not failed)

    return report


def _translator(call: UpstreamCall, upstream: OpenAIUpstream, requested: str) -> Translator:
    if call.reply is Reply.CHAT_FROM_COMPLETION:
        return ChatFromCompletion(requested)
    passthrough = Passthrough(served=upstream.served_model_name, requested=requested)
    if call.path == CHAT_PATH and not upstream.profile.chat_has_refusal:
        return ChatWithRefusal(passthrough)
    return passthrough


async def _json_response(upstream: OpenAIUpstream, response: UpstreamResponse, translator: Translator,
                         headers: dict[str, str], outcome: Outcome) -> Response:
    try:
        body = await response.read()
        if response.status != 200:
            raise upstream_error(response.status, body, upstream.profile.rejects_with_500)
        if not (body.startswith(b"{") and body.rstrip().endswith(b"}")):
            raise GatewayError(502, "The model backend sent a malformed answer.", type="upstream_error",
                               code="upstream_malformed")
        outcome.usage = orjson.loads(body).get("usage")  # for token metrics and rate-limit reconciliation
        outcome.total_tokens = (outcome.usage or {}).get("total_tokens")
        return Response(translator.body(body), media_type="application/json", headers=headers)
    finally:
        await outcome.done()


async def _stream_response(upstream: OpenAIUpstream, response: UpstreamResponse, call: UpstreamCall,
                           translator: Translator, requested: str, headers: dict[str, str],
                           outcome: Outcome) -> Response:
    if response.status != 200:
        body = await response.read()
        await outcome.done()
        raise upstream_error(response.status, body, upstream.profile.rejects_with_500)
    usage = None
    if call.include_usage and not upstream.profile.sends_stream_usage:
        usage = UsageCounter(count_prompt_tokens=lambda: _count_prompt(upstream, call))
    outcome.watch = StreamWatch(deadline=time.monotonic() + upstream.timeouts.total_s)
    events = relay_stream(response, translator, requested, usage, outcome.watch,
                          empty_is_rejection=upstream.profile.rejects_with_500 is not None)
    return StreamingResponse(_finishing(events, outcome), media_type="text/event-stream",
                             headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"})


async def _finishing(events: AsyncIterator[bytes], outcome: Outcome) -> AsyncIterator[bytes]:
    """Relay, then report the outcome, also when the client went away mid-stream."""
    try:
        async for event in events:
            yield event
    finally:
        await events.aclose()  # closes the engine's connection at once: vLLM aborts the generation
        await outcome.done()


async def _count_prompt(upstream: OpenAIUpstream, call: UpstreamCall) -> int:
    text = call.prompt_text or ""
    counted = await upstream.count_tokens(text) if text else None
    return counted if counted is not None else max(1, call.prompt_estimate)
