"""Relay an engine's answer to the client: translate its shape, absorb engine quirks, keep errors in shape.

Streams are relayed as they arrive (no buffering beyond one incomplete SSE event).
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import orjson

from gateway.backends.translate import Translator
from gateway.backends.upstream import UpstreamBroken, UpstreamResponse, UpstreamStalled
from gateway.errors import GatewayError

_EVENT_BOUNDARY = re.compile(rb"\r?\n\r?\n")
_DONE = b"[DONE]"
_DONE_EVENT = b"data: [DONE]\n\n"
_OPENAI_ERROR_TYPES = {"invalid_request_error", "not_found_error", "permission_error",
                       "authentication_error", "rate_limit_error", "server_error"}


@dataclass
class UsageCounter:
    """Counts a stream's tokens for engines that do not send the `include_usage` chunk themselves."""

    count_prompt_tokens: Callable[[], Awaitable[int]]
    first_chunk: dict | None = None
    completion_tokens: dict[int, int] = field(default_factory=dict)
    engine_sent_usage: bool = False

    def observe(self, chunk: dict) -> None:
        if self.first_chunk is None:
            self.first_chunk = chunk
        if chunk.get("usage"):
            self.engine_sent_usage = True
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            text = delta.get("content") if "delta" in choice else choice.get("text")
            if text:
                index = choice.get("index", 0)
                # llama.cpp and vLLM emit one generated token per content chunk.
                self.completion_tokens[index] = self.completion_tokens.get(index, 0) + 1

    async def usage(self) -> dict | None:
        if self.engine_sent_usage or self.first_chunk is None:
            return None
        prompt_tokens = await self.count_prompt_tokens()
        completion = sum(self.completion_tokens.values())
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def usage_event(self, usage: dict, requested_model: str) -> bytes:
        assert self.first_chunk is not None
        chunk = {
            "id": self.first_chunk.get("id"),
            "object": self.first_chunk.get("object"),
            "created": self.first_chunk.get("created"),
            "model": requested_model,
            "choices": [],
            "usage": usage,
        }
        return orjson.dumps(chunk)


def split_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete SSE events in `buffer`, and the incomplete rest."""
    # vLLM ends events with "\n\n"; llama.cpp's server (sse-starlette) with "\r\n\r\n".
    parts = _EVENT_BOUNDARY.split(buffer) if b"\r" in buffer else buffer.split(b"\n\n")
    return parts[:-1], parts[-1]


def event_data(event: bytes) -> bytes | None:
    """The `data:` payload of one SSE event (joined per the SSE spec), None for comments/keep-alives."""
    if event.startswith(b"data: ") and b"\n" not in event:  # the one-line event every engine sends
        return event[6:]
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


@dataclass
class StreamWatch:
    """What happened while a stream was relayed: for metrics, rate limits and outlier detection."""

    deadline: float  # monotonic time by which the whole answer must be relayed
    events: int = 0
    first_event_at: float | None = None
    gaps: list[float] = field(default_factory=list)
    failure: str | None = None  # set when the engine broke off, stalled or sent garbage mid-stream (blamed)
    engine_error: str | None = None  # the engine's own error event mid-stream (a 502 for the client)
    usage: dict | None = None  # the engine's (or, where it sends none, the gateway's) usage of the stream
    usage_by_gateway: bool = False  # `usage` is the gateway's own count (the engine sends none)
    completed: bool = False  # the engine's [DONE] arrived
    _last: float | None = None

    @property
    def status(self) -> int:
        """The status this stream counts as in metrics: 502 once the engine failed mid-way."""
        return 502 if self.failure is not None or self.engine_error is not None else 200

    def saw_events(self, count: int, now: float) -> None:
        """`count` events arrived in one read: one gap per read (events that arrive together are one write
        of the engine, and a histogram observation per event cost ~8% of the relay's CPU)."""
        self.events += count
        if self._last is None:
            self.first_event_at = now
        else:
            self.gaps.append(now - self._last)
        self._last = now


def error_event(message: str, code: str, type: str = "upstream_error") -> bytes:
    """One SSE event the official SDK raises on: never a silent end that looks like a full answer."""
    body = {"error": {"message": message, "type": type, "param": None, "code": code}}
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def relay_stream(
    response: UpstreamResponse, translator: Translator, requested_model: str, usage: UsageCounter | None,
    watch: StreamWatch, empty_is_rejection: bool = False, forward_usage: bool = True,
) -> AsyncIterator[bytes]:
    """Yield the client's SSE bytes from an engine's SSE response: all complete events of each read at once.

    Each read is forwarded as soon as it arrives (no buffering beyond an incomplete event), as one write.
    The usage of the stream is kept in `watch.usage` (rate limits are reconciled with it); the usage
    chunk reaches the client only if it asked for it (`forward_usage`).
    `empty_is_rejection`: the engine answers a request it finds invalid once streaming started with a
    stream that ends cleanly before any event (llama-cpp-python): the client's error, not the engine's.
    """
    buffer = b""
    try:
        async for raw in response.chunks():
            now = time.monotonic()
            if now > watch.deadline:
                watch.failure = "total timeout"
                yield translator.end(error_event("The model backend did not finish its answer in time.",
                                                 "upstream_timeout"))
                return
            events, buffer = split_events(buffer + raw if buffer else raw)
            out: list[bytes] = []
            seen = 0
            for event in events:
                data = event_data(event)
                if data is None:
                    continue
                if data == _DONE:
                    watch.completed = True
                    if seen:
                        watch.saw_events(seen, now)
                    if usage is not None and forward_usage:
                        # Let go of the engine first: llama.cpp's tokenizer waits for its model lock.
                        response.close()
                        if (counted := await usage.usage()) is not None:
                            watch.usage, watch.usage_by_gateway = counted, True
                            out.append(translator.frame(usage.usage_event(counted, requested_model)))
                    out.append(translator.end(_DONE_EVENT))
                    yield b"".join(out)
                    if usage is not None and not forward_usage:  # counted after the client has its answer
                        response.close()
                        watch.usage = await usage.usage()
                        watch.usage_by_gateway = watch.usage is not None
                    await response.finish()  # keep the connection pooled
                    return
                if not (data.startswith(b"{") and data.endswith(b"}")):  # cheap: no parse of what is forwarded
                    watch.failure = "malformed event"
                    out.append(translator.end(error_event("The model backend sent a malformed stream.",
                                                          "upstream_malformed")))
                    yield b"".join(out)
                    return
                if data.startswith(_ERROR_EVENT_STARTS):  # the engine failed after its 200
                    if seen:
                        watch.saw_events(seen, now)
                    out.append(translator.end(_engine_error_event(data, watch)))
                    yield b"".join(out)
                    return
                if usage is not None:
                    usage.observe(orjson.loads(data))
                if b'"usage":{' in data or b'"usage": {' in data:  # the engine's usage chunk (or a last
                    chunk = orjson.loads(data)                      # chunk that carries usage)
                    watch.usage = chunk.get("usage") or watch.usage
                    if not forward_usage and not chunk.get("choices"):
                        continue
                seen += 1
                out.append(translator.frame(data))
            if seen:
                watch.saw_events(seen, now)
            if out:
                yield b"".join(out)
        if empty_is_rejection and watch.events == 0:
            yield translator.end(error_event("The model backend rejected the request as invalid (it ended the "
                                             "stream without an answer).", "invalid_value",
                                             type="invalid_request_error"))
            return
        watch.failure = "ended without [DONE]"
    except UpstreamStalled:
        watch.failure = "stalled"
        yield translator.end(error_event("The model backend stopped sending in the middle of the answer.",
                                         "upstream_timeout"))
        return
    except (UpstreamBroken, orjson.JSONDecodeError) as exc:
        watch.failure = type(exc).__name__
    finally:
        response.close()
    yield translator.end(error_event("The model backend disconnected in the middle of the answer.",
                                     "upstream_disconnected"))


# vLLM's error event after streaming began: `{"error": {...}}` (0.10+, json.dumps spacing), or the older
# top-level `{"object": "error", ...}`. Content events start with `{"id"`, so a prefix test suffices.
_ERROR_EVENT_STARTS = (b'{"error"', b'{"object": "error"', b'{"object":"error"')


def _engine_error_event(data: bytes, watch: StreamWatch) -> bytes:
    """The client's error event for the engine's: message cleaned (no paths, no traceback), OpenAI's
    envelope. The backend is blamed only for an engine-side failure (5xx), not for a request it refused."""
    raw_message, _, _, _ = _parse_engine_error(data)
    try:
        parsed = orjson.loads(data)
        inner = parsed.get("error") if isinstance(parsed.get("error"), dict) else parsed
        code = int(inner.get("code") or 500)
    except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
        code = 500
    message = clean_engine_message(raw_message)
    watch.engine_error = message
    if code >= 500:
        watch.failure = "engine error event"
    return error_event(f"The model backend failed in the middle of the answer: {message}", "upstream_error")


# Engine messages may carry a traceback or the engine's file paths: neither is the client's business.
_TRACEBACK = re.compile(r"Traceback \(most recent call last\):.*|\s*File \"[^\"]*\", line \d+.*", re.S)
_PATH = re.compile(r"(?:/[\w.@+-]+)+\.py\b(?:, line \d+)?|(?:/[\w.@+-]+){3,}/?")
_MAX_MESSAGE = 400


def clean_engine_message(message: str) -> str:
    head, marker, trace = message.partition("Traceback (most recent call last):")
    if marker:  # keep what the traceback says went wrong (its last line), never its frames
        said = [line.strip() for line in trace.splitlines() if line.strip() and not line.strip().startswith("File ")]
        message = f"{head} {said[-1]}" if said else head
    message = _PATH.sub("<path>", _TRACEBACK.sub("", message))
    message = " ".join(message.split())
    return message[:_MAX_MESSAGE] + ("..." if len(message) > _MAX_MESSAGE else "") or "no detail"


def upstream_error(status: int, body: bytes, rejects_with_500: re.Pattern[str] | None = None) -> GatewayError:
    """The engine's error, in OpenAI's envelope, with the engine's status for client errors.

    `rejects_with_500`: the engine's way of saying "invalid request" with a 500 (llama-cpp-python turns
    the exceptions its sampling code raises on bad input into 500s); those are the client's 400.
    """
    raw_message, err_type, param, code = _parse_engine_error(body)
    message = clean_engine_message(raw_message)
    if status >= 500 and rejects_with_500 is not None and rejects_with_500.search(raw_message):
        return GatewayError(400, f"The model backend rejected the request as invalid: {message}",
                            param=param, code=code or "invalid_value")
    if status >= 500:
        return GatewayError(502, f"The model backend failed: {message}", type="upstream_error",
                            code="upstream_error")
    if status == 422:  # FastAPI-based engines use 422 for what OpenAI calls 400
        status = 400
    if err_type not in _OPENAI_ERROR_TYPES:
        err_type = "invalid_request_error"
    return GatewayError(status, message, type=err_type, param=param, code=code)


def _parse_engine_error(body: bytes) -> tuple[str, str, str | None, str | None]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")[:500], "", None, None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        data = data["error"]  # OpenAI / vLLM >= 0.10 / llama.cpp shape
    if not isinstance(data, dict):
        return str(data)[:500], "", None, None
    message = data.get("message") or data.get("detail") or ""
    if not isinstance(message, str):
        message = orjson.dumps(message).decode()[:500]
    code = data.get("code")
    param = data.get("param")
    return (message, str(data.get("type") or ""), param if isinstance(param, str) else None,
            code if isinstance(code, str) else None)
