"""Every response carries `x-request-id` (the client's own when it sent one, else a fresh one) and
`x-gateway-overhead-ms` (time spent in the gateway up to the response headers, the wait on engines
excluded, as LiteLLM reports it), and every request leaves one JSON access-log line with its id.

A pure ASGI middleware (no BaseHTTPMiddleware): it only adds two headers and a log line.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.observability.request_context import RequestContext

_ACCEPTABLE = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
access_log = logging.getLogger("gateway.access")
# Ids need only be unique, not secret: a random per-process prefix and a counter (uuid4 per request
# showed up at ~5% of the request path's CPU).
_PREFIX = os.urandom(8).hex()
_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_PREFIX}{next(_COUNTER):016x}"


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _from_client(scope) or new_request_id()
        context = RequestContext(request_id)
        scope.setdefault("state", {})["context"] = context
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode()),
                                      (b"x-gateway-overhead-ms", b"%.3f" % context.overhead_ms())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(orjson.dumps({
                    "request_id": request_id, "method": scope["method"], "path": scope["path"],
                    "status": status, "duration_ms": round((time.perf_counter() - context.started) * 1000, 2),
                    "client": (scope.get("client") or ("", 0))[0],
                }).decode())


def _from_client(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            return value.decode() if _ACCEPTABLE.match(value) else None
    return None
