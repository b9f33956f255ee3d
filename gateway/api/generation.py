"""The two generation routes, `POST /v1/chat/completions` and `POST /v1/completions`, as plain ASGI.

They go straight to `gateway.pipeline`; every other request (models, admin, metrics, health) and the
lifespan go on to the FastAPI app. Why not FastAPI routes: its middleware stack, routing and
dependency resolution cost ~150 µs per request on this machine (an empty handler: 4,400 requests/s
on one core through FastAPI, 13,100 as plain ASGI under uvicorn), as much as the whole upstream hop.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway import pipeline
from gateway.api.errors import error_response
from gateway.errors import GatewayError
from gateway.observability.request_context import RequestContext

log = logging.getLogger("gateway.api")

ENDPOINTS = {"/v1/chat/completions": pipeline.CHAT, "/v1/completions": pipeline.COMPLETIONS}
# OpenAI refuses bodies over its limit with a 413; ours is far above any prompt an engine here takes.
MAX_BODY_BYTES = 32 * 1024 * 1024


class GenerationRoutes:
    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = ENDPOINTS.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        context: RequestContext = scope["state"]["context"]
        try:
            response = await self._generate(endpoint, scope, receive, context)
        except GatewayError as exc:
            response = error_response(exc)
        except Exception:
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            response = error_response(GatewayError(
                500, "The gateway had an internal error handling your request.", type="server_error"))
        await response(scope, receive, send)

    async def _generate(self, endpoint: pipeline.Endpoint, scope: Scope, receive: Receive,
                        context: RequestContext) -> Response:
        if scope["method"] != "POST":
            raise GatewayError(405, f"Invalid method for URL ({scope['method']} {scope['path']}).",
                               code="method_not_allowed", headers={"Allow": "POST"})
        raw = await _read_body(receive)
        return await pipeline.serve(self.app.state.gateway, endpoint, _authorization(scope), raw, context)


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body"):
        return body
    parts = [body]
    size = len(body)
    while message.get("more_body"):
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
        size += len(parts[-1])
        if size > MAX_BODY_BYTES:
            raise GatewayError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.",
                               code="request_too_large")
    return b"".join(parts)


def _authorization(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return value.decode("latin-1")
    return None
