"""Every response carries `x-request-id` (the client's own when it sent one, else a fresh one), and
every request leaves one JSON access-log line that carries it too.

A pure ASGI middleware (no BaseHTTPMiddleware): it only adds a header and a log line.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_ACCEPTABLE = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
access_log = logging.getLogger("gateway.access")


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _from_client(scope) or uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = request_id.decode()
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(orjson.dumps({
                    "request_id": request_id.decode(), "method": scope["method"], "path": scope["path"],
                    "status": status, "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                    "client": (scope.get("client") or ("", 0))[0],
                }).decode())


def _from_client(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            return value if _ACCEPTABLE.match(value) else None
    return None
