"""Send one prepared call to the first backend that answers, and shape the answer for the client.

Backends are tried in the order routing chose. A backend that cannot be reached, times out before its
headers (streams), or answers 502/503/504 is given up for the next one, at most `max_attempts` in all
and only while the retry budget allows. Nothing is retried once a byte went to the client, and a
non-streamed request the engine accepted is never retried (the generation would run twice).

Only engine faults count against a backend's health: connect failures, 502/503/504, other 5xx that are
not the engine's answer to an invalid request, malformed output, and stalls or breaks mid-stream. A
client's invalid request, a gateway-side encoding error, a generation that outlived its timeout and a
client that went away say nothing about the engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import orjson
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.backends.relay import StreamWatch, UsageCounter, relay_stream, upstream_error
from gateway.backends.requests import EnginePayloads, Unsupported
from gateway.backends.translate import (ChatFromCompletion, ChatWithRefusal, CompletionLogprobs, Passthrough,
                                        Translator)
from gateway.backends.upstream import (GenerationTimedOut, OpenAIUpstream, ProbeVerdict, Unreachable,
                                       UpstreamResponse, UpstreamUnavailable, for_how_long, looks_lasting)
from gateway.errors import BackendFailure, ClientGone, GatewayError, no_backend_available
from gateway.prompts.prepare import CHAT_PATH, Reply, UpstreamCall
from gateway.registry.schema import Role

_RETRYABLE = (502, 503, 504)
ClientWatch = Callable[[], Awaitable[None]]  # returns when the client has closed its connection


@dataclass
class Outcome:
    """What the caller learns when the answer is complete (rate limits, metrics, outlier detection)."""

    total_tokens: int | None = None  # from the engine's usage, when the answer carried one
    usage: dict | None = None
    watch: StreamWatch | None = None  # streams only
    backend_id: str | None = None
    retries: int = 0
    fell_back: bool = False
    engine_fault: bool = False  # the engine answered with a 5xx of its own (not an invalid-request answer)
    status: int | None = None  # the client's status where known before the callbacks (streams: see watch)
    # What later requests depend on (limiter slots and tokens): settled before a JSON answer is handed
    # over, so a client's next request sees them released. Then `on_done` (health, metrics, usage record,
    # in-flight count): for a JSON answer after its body went out (`AnswerThenReport`).
    releases: list["OutcomeCallback"] = field(default_factory=list)
    on_done: list["OutcomeCallback"] = field(default_factory=list)

    async def release(self) -> None:
        """Run the `releases` callbacks (once)."""
        callbacks, self.releases = self.releases, []
        rest = _run_until_one_waits(callbacks, self)
        if rest is not None:
            await asyncio.shield(rest)

    async def done(self) -> None:
        """Run every callback once, in order, to the end even when the caller is cancelled (a client that
        went away mid-stream): in-flight counts, limiter releases and health reports must never be skipped."""
        # One list, so that a cancel while a release waits shields the bookkeeping after it too.
        callbacks = self.releases + self.on_done if self.releases else self.on_done
        self.releases, self.on_done = [], []
        rest = _run_until_one_waits(callbacks, self)
        if rest is not None:
            await asyncio.shield(rest)


OutcomeCallback = Callable[[Outcome], Awaitable[None] | None]


def _run_until_one_waits(callbacks: list[OutcomeCallback], outcome: Outcome) -> Awaitable[None] | None:
    """Run callbacks until one returns an awaitable (it must wait on I/O); return the rest of the work, to
    be shielded, or None when all are done. A callback that returns None has run: nothing can interrupt
    it. (Always shielding cost a task and a loop round trip per request: ~6 % of the gateway's CPU.)"""
    for index, callback in enumerate(callbacks):
        pending = callback(outcome)
        if pending is not None:
            return _finish(pending, callbacks[index + 1:], outcome)
    return None


async def _finish(pending: Awaitable[None], callbacks: list[OutcomeCallback], outcome: Outcome) -> None:
    await pending
    for callback in callbacks:
        more = callback(outcome)
        if more is not None:
            await more


@dataclass
class Attempts:
    """The per-request side of retries; the shared budget decides whether one more try is allowed."""

    max_attempts: int
    may_retry: Callable[[], bool]
    started: Callable[[str], None]
    finished: Callable[[str, bool], None]
    released: Callable[[str], None]  # the call says nothing about the backend's health
    waited: Callable[[float], None]  # time spent waiting on an engine (excluded from the gateway's overhead)
    # What the health probes know of a failing backend (None: passing): a name that does not resolve,
    # or `lasting_after_s` of refused connections, and the 503 says the failure looks permanent.
    probe_verdict: Callable[[str], ProbeVerdict | None] = lambda _backend_id: None
    lasting_after_s: float = 60.0


async def dispatch(upstreams: list[OpenAIUpstream], payloads: EnginePayloads, requested: str,
                   headers: dict[str, str], outcome: Outcome, attempts: Attempts, retry_after_s: int,
                   client_gone: ClientWatch | None = None) -> Response:
    call = payloads.call
    stream = call.stream
    failures: list[BackendFailure] = []
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
        data = _encoded(body, upstream.served_model_name)  # before the attempt: never the engine's fault
        outcome.retries = tried
        tried += 1
        attempts.started(upstream.id)
        sent = time.perf_counter()
        try:
            if stream or client_gone is None:  # a stream's disconnect is seen by the streaming response
                response = await upstream.post(call.path, data, stream=stream)
            else:
                response = await _post_while_client_waits(upstream, call.path, data, client_gone)
        except UpstreamUnavailable as exc:
            attempts.waited(time.perf_counter() - sent)
            attempts.finished(upstream.id, False)
            failures.append(_failure(exc, attempts))
            timed_out = timed_out or exc.timed_out
            continue
        except GenerationTimedOut:
            attempts.released(upstream.id)
            raise GatewayError(504, f"The model backend did not finish the answer within "
                               f"{upstream.timeouts.generation_s:g} s; ask for fewer tokens or stream it.",
                               type="upstream_error", code="generation_timeout") from None
        except GatewayError:  # the engine broke off its answer
            attempts.finished(upstream.id, False)
            raise
        except BaseException:  # cancelled (the client went away): nothing learnt about the engine
            attempts.released(upstream.id)
            raise
        attempts.waited(time.perf_counter() - sent)
        if response.status in _RETRYABLE:  # engine up but not serving: try the next one
            response.close()
            attempts.finished(upstream.id, False)
            failures.append(BackendFailure(upstream.id, upstream.backend.base_url, f"answered HTTP {response.status}"))
            continue
        outcome.backend_id = upstream.name  # the registry's backend id, never a pod's address
        outcome.fell_back = upstream.backend.role is Role.FALLBACK
        headers = {**headers, "x-gateway-backend": upstream.name}
        if outcome.fell_back:
            headers["x-gateway-fallback"] = "cpu"
        outcome.on_done.insert(0, _report_health(attempts, upstream.id))
        translator = _translator(call, upstream, requested)
        if stream:
            if call.restyle_stream is not None:
                translator = call.restyle_stream(translator)
            return await _stream_response(upstream, response, call, translator, requested, headers, outcome)
        return await _json_response(upstream, response, translator, headers, outcome)
    if not tried and refusal is not None:
        raise refusal.to_client_error(requested)
    if timed_out:
        raise GatewayError(504, f"No backend for `{requested}` answered in time ({'; '.join(map(str, failures))}).",
                           type="upstream_error", code="upstream_timeout")
    raise no_backend_available(requested, failures or "no healthy backend", retry_after_s)


def _failure(exc: UpstreamUnavailable, attempts: Attempts) -> BackendFailure:
    probes = attempts.probe_verdict(exc.backend_id)
    reason = exc.reason
    if probes is not None and exc.kind is Unreachable.REFUSED:
        reason += f" ({for_how_long(probes.failing_for_s)}, by the health probes)"
    elif probes is not None and exc.kind is Unreachable.LOOKUP_FAILED:
        reason += f"; at its last health probe: {probes.failure.reason}"
    return BackendFailure(exc.backend_id, exc.url, reason, looks_lasting(exc.kind, probes, attempts.lasting_after_s))


async def _post_while_client_waits(upstream: OpenAIUpstream, path: str, data: bytes,
                                   client_gone: ClientWatch) -> UpstreamResponse:
    """A non-streamed call, cancelled when the client goes away: closing the engine's connection makes
    vLLM abort a generation nobody would read. One watcher task; the call itself runs inline."""
    me = asyncio.current_task()
    assert me is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        await client_gone()
        gone = True
        me.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await upstream.post(path, data, stream=False)
    except asyncio.CancelledError:
        if gone:
            me.uncancel()
            raise ClientGone() from None
        raise
    finally:
        watcher.cancel()


def _encoded(body: dict, served_model: str) -> bytes:
    try:
        return orjson.dumps({**body, "model": served_model})
    except orjson.JSONEncodeError:  # validation bounds nesting; this is the last line of defence
        raise GatewayError(400, "The request could not be encoded for the model backend.") from None


def _report_health(attempts: Attempts, backend_id: str) -> OutcomeCallback:
    def report(outcome: Outcome) -> None:
        failed = outcome.engine_fault or (outcome.watch is not None and outcome.watch.failure is not None)
        attempts.finished(backend_id, not failed)

    return report


def _translator(call: UpstreamCall, upstream: OpenAIUpstream, requested: str) -> Translator:
    if call.reply is Reply.CHAT_FROM_COMPLETION:
        return ChatFromCompletion(requested)
    passthrough = Passthrough(served=upstream.served_model_name, requested=requested)
    if call.path == CHAT_PATH and not upstream.profile.chat_has_refusal:
        return ChatWithRefusal(passthrough)
    if call.path != CHAT_PATH and call.payload.get("logprobs") is not None:
        return CompletionLogprobs(passthrough)
    return passthrough


async def _json_response(upstream: OpenAIUpstream, response: UpstreamResponse, translator: Translator,
                         headers: dict[str, str], outcome: Outcome) -> Response:
    answer: Response | None = None
    try:
        body = await response.read()
        if response.status != 200:
            error = upstream_error(response.status, body, upstream.profile.rejects_with_500)
            outcome.engine_fault = error.status >= 500
            raise error
        if not (body.startswith(b"{") and body.rstrip().endswith(b"}")):
            outcome.engine_fault = True
            raise GatewayError(502, "The model backend sent a malformed answer.", type="upstream_error",
                               code="upstream_malformed")
        outcome.usage = orjson.loads(body).get("usage")  # for token metrics and rate-limit reconciliation
        outcome.total_tokens = (outcome.usage or {}).get("total_tokens")
        outcome.status = 200
        if outcome.releases:
            await outcome.release()
        answer = AnswerThenReport(outcome, translator.body(body), media_type="application/json", headers=headers)
        return answer
    except GatewayError as exc:
        outcome.status = exc.status
        raise
    finally:
        if answer is None:
            await outcome.done()


class AnswerThenReport(Response):
    """A JSON answer whose outcome (usage record, metrics, health, in-flight count) is reported once the
    body went out, not before: the client's latency does not include the bookkeeping. Reported whether or
    not the send succeeds. The limiter's releases were settled before (`Outcome.releases`)."""

    reports_when_sent = True  # RequestRecord counts it from the outcome

    def __init__(self, outcome: Outcome, content: bytes, media_type: str, headers: dict[str, str]) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self._outcome = outcome

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._outcome.done()


async def _stream_response(upstream: OpenAIUpstream, response: UpstreamResponse, call: UpstreamCall,
                           translator: Translator, requested: str, headers: dict[str, str],
                           outcome: Outcome) -> Response:
    if response.status != 200:
        error = upstream_error(response.status, await response.read(), upstream.profile.rejects_with_500)
        outcome.engine_fault = error.status >= 500
        outcome.status = error.status
        await outcome.done()
        raise error
    usage = None  # rate limits need every stream's usage, asked for by the client or not
    if not upstream.profile.sends_stream_usage:
        usage = UsageCounter(count_prompt_tokens=lambda: _count_prompt(upstream, call))
    outcome.watch = StreamWatch(deadline=time.monotonic() + upstream.timeouts.total_s)
    events = relay_stream(response, translator, requested, usage, outcome.watch,
                          empty_is_rejection=upstream.profile.rejects_with_500 is not None,
                          forward_usage=call.include_usage)
    return StreamingResponse(_finishing(events, outcome), media_type="text/event-stream",
                             headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"})


async def _finishing(events: AsyncIterator[bytes], outcome: Outcome) -> AsyncIterator[bytes]:
    """Relay, then report the outcome, also when the client went away mid-stream."""
    relayed = False
    try:
        async for event in events:
            yield event
        relayed = True
    finally:
        if relayed:  # the engine's stream ended: nothing left to cut short (done() shields its own waits)
            await _close_and_report(events, outcome)
        else:
            # Shielded: a client gone mid-stream cancels this generator, and the engine's connection must
            # still close (vLLM aborts the generation) and the outcome still be reported.
            await asyncio.shield(_close_and_report(events, outcome))


async def _close_and_report(events: AsyncIterator[bytes], outcome: Outcome) -> None:
    try:
        await events.aclose()
    finally:
        if outcome.watch is not None and outcome.watch.usage:
            outcome.usage = outcome.watch.usage
            outcome.total_tokens = outcome.usage.get("total_tokens")
        await outcome.done()


async def _count_prompt(upstream: OpenAIUpstream, call: UpstreamCall) -> int:
    text = call.prompt_text or ""
    counted = await upstream.count_tokens(text) if text else None
    return counted if counted is not None else max(1, call.prompt_bound)
