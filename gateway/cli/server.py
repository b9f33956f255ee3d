"""uvicorn, with a drain before exit: SIGTERM first turns `/ready` to 503 and refuses new requests,
waits for the requests and streams in flight (at most the drain timeout), then lets uvicorn stop."""

from __future__ import annotations

import asyncio
import logging
import weakref
from types import FrameType

import orjson
import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from gateway import deadlines
from gateway.deadlines import Deadline
from gateway.lifecycle import LIFECYCLE

log = logging.getLogger("gateway.lifecycle")


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, plus a deadline for each request's headers.

    uvicorn arms its keep-alive timer only after a response, so a connection that sends nothing, or half
    a request line, was held for ever and counted against `limit_concurrency`: a few dozen such sockets
    locked every tenant out. Here a connection whose request headers are not complete within
    `header_timeout_s` of it opening (or of its next request starting) is closed."""

    header_timeout_s = 10.0
    max_connections: int | None = None
    linger_s = 2.0
    _header_deadline: Deadline | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_deadline is None:
            self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        limit = self.max_connections
        if limit is not None and (len(self.connections) > limit or len(self.tasks) >= limit):
            # uvicorn's own `limit_concurrency` answers a plain-text 503; this one is OpenAI's envelope.
            app, self.app = self.app, over_capacity
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        else:
            super().on_headers_complete()
        if self.scope["method"] not in ("GET", "HEAD"):  # a body may still be on its way when we answer
            self.cycle.transport = LingeringClose(self, self.cycle)

    def close_lingering(self, cycle: RequestResponseCycle) -> None:
        """Close after an answer given before the request's body was read (a refusal, a 408, a 413).

        Closing a socket with unread bytes in it makes the kernel send a reset, and a reset that reaches
        the client before it has read our answer throws the answer away: the client saw "connection reset"
        instead of OpenAI's 503 or 429. So, as nginx's lingering close: send FIN after the answer, read and
        drop whatever the client still sends, and close once it closes or after `linger_s`."""
        transport = self.transport
        if not cycle.more_body or transport.is_closing() or not transport.can_write_eof():
            transport.close()
            return
        self.parser = _DISCARD  # nothing after this answer is a request
        transport.write_eof()
        self.flow.resume_reading()
        self.loop.call_later(self.linger_s, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        # coarse deadlines: a loop timer per request cost ~3.5 µs (gateway/deadlines.py)
        self._header_deadline = deadlines.for_loop(self.loop).call_later(self.header_timeout_s,
                                                                         self._headers_too_late)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_late(self) -> None:
        self._header_deadline = None
        if self.cycle is None or self.cycle.response_complete:  # no request of this connection under way
            self.transport.close()


class _DiscardingParser:
    def feed_data(self, data: bytes) -> None:
        pass


_DISCARD = _DiscardingParser()


class LingeringClose:
    """The transport a request cycle writes to: the connection's own, but `close` lingers (above).

    Bound methods of the real transport are copied in, so a write costs what it did. The cycle is held
    weakly: the cycle holds this as its transport, and a strong reference back made every POST's cycle,
    its event, bound methods and closures (~16 objects) garbage that only the cyclic collector frees
    (~13 µs a request at c64 and a multi-millisecond pause every few hundred requests)."""

    __slots__ = ("write", "is_closing", "get_extra_info", "_protocol", "_cycle")

    def __init__(self, protocol: HeaderDeadlineProtocol, cycle: RequestResponseCycle) -> None:
        transport = protocol.transport
        self.write, self.is_closing, self.get_extra_info = (transport.write, transport.is_closing,
                                                            transport.get_extra_info)
        self._protocol, self._cycle = protocol, weakref.ref(cycle)

    def close(self) -> None:
        cycle = self._cycle()  # alive: only a running cycle closes its transport
        if cycle is None:
            self._protocol.transport.close()
        else:
            self._protocol.close_lingering(cycle)


_OVER_CAPACITY = orjson.dumps({"error": {
    "message": "The gateway has too many open connections right now; retry shortly.",
    "type": "service_unavailable_error", "param": None, "code": "too_many_connections"}})


async def over_capacity(scope: Scope, receive: Receive, send: Send) -> None:
    """The answer past `GATEWAY_MAX_CONNECTIONS`: before any work, and the connection closed."""
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(_OVER_CAPACITY)).encode()),
        (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": _OVER_CAPACITY})


def http_protocol(header_timeout_s: float, max_connections: int | None = None) -> type[HeaderDeadlineProtocol]:
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,),
                {"header_timeout_s": header_timeout_s, "max_connections": max_connections})


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if LIFECYCLE.draining or self._loop is None:  # a second signal: stop now
            super().handle_exit(sig, frame)
            return
        LIFECYCLE.draining = True
        log.info("draining: %d requests in flight, waiting up to %.0fs", LIFECYCLE.inflight, self._drain_timeout_s)
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain_then_exit(sig, frame)))

    async def _drain_then_exit(self, sig: int, frame: FrameType | None) -> None:
        finished = await LIFECYCLE.drain(self._drain_timeout_s)
        if finished:
            log.info("drained: every request in flight finished")
        else:
            log.warning("drain timeout: %d requests cut off", LIFECYCLE.inflight)
        super().handle_exit(sig, frame)
        # uvicorn re-raises a captured SIGTERM after shutdown, so the process would die "by signal";
        # a completed drain is a clean exit (status 0), which is what a rolling update expects.
        self._captured_signals.clear()
