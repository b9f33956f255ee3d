"""Every response carries `x-request-id` (always the gateway's own id: it keys the audit and usage
records, so no client may choose it, or reuse another request's) and `x-gateway-overhead-ms` (time spent
in the gateway up to the response headers, the wait on engines excluded, as LiteLLM reports it), and
every request leaves one JSON access-log line with its id.

A client may name its request as OpenAI lets it, with `x-client-request-id` (the `x-request-id` it sent
counts the same, for clients written against older gateways): kept beside the gateway's id as
`client_request_id` in the access log and in the audit and usage records, and echoed back as
`x-client-request-id`. Only visible ASCII and spaces, at most 512 characters (OpenAI's bound), is kept;
anything else is dropped, not trimmed: an altered id would no longer match what the client logged.

A pure ASGI middleware (no BaseHTTPMiddleware): it only adds headers and a log line.
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

_ACCEPTABLE = re.compile(rb"[\x20-\x7e]{1,512}")  # fullmatch; h11 already strips surrounding spaces
_CLIENT_HEADERS = (b"x-client-request-id", b"x-request-id")  # OpenAI's name first
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
        request_id = new_request_id()
        client_id = client_request_id(scope["headers"])
        context = RequestContext(request_id, client_id)
        scope.setdefault("state", {})["context"] = context
        status = 0  # none sent yet
        echoed = [(b"x-request-id", request_id.encode())]
        if client_id is not None:
            echoed.append((b"x-client-request-id", client_id.encode()))

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *echoed,
                                      (b"x-gateway-overhead-ms", b"%.3f" % context.overhead_ms())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except BaseException:
            status = status or 500
            raise
        else:
            # The app answers every request it can; it sends nothing only when its client left first
            # (ClientGone). Logged as nginx's "client closed request", as the metrics and the usage
            # record count it, not as a 500 an operator would take for the gateway's own failure.
            status = status or 499
        finally:
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(orjson.dumps({
                    "request_id": request_id, "client_request_id": client_id, "method": scope["method"],
                    "path": scope["path"], "status": status,
                    "duration_ms": round((time.perf_counter() - context.started) * 1000, 2),
                    "client": (scope.get("client") or ("", 0))[0],
                }).decode())


def client_request_id(headers) -> str | None:
    """The client's own id for its request: `x-client-request-id`, else its `x-request-id`, when acceptable."""
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        if name in _CLIENT_HEADERS:
            found.setdefault(name, value)
    for name in _CLIENT_HEADERS:
        value = found.get(name)
        if value is not None:
            return value.decode("ascii") if _ACCEPTABLE.fullmatch(value) else None
    return None
