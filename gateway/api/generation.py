"""The generation routes, `POST /v1/chat/completions`, `/v1/completions` and `/v1/responses`, as plain ASGI.

They go straight to `gateway.pipeline`; every other request (models, admin, metrics, health) and the
lifespan go on to the FastAPI app. Why not FastAPI routes: its middleware stack, routing and
dependency resolution cost ~150 µs per request on this machine (an empty handler: 4,400 requests/s
on one core through FastAPI, 13,100 as plain ASGI under uvicorn), as much as the whole upstream hop.

The caller is identified before the body is read (an unknown key costs no upload), the body is read
with a size cap and a deadline, and a client that goes away before its answer starts cancels the
request, which closes the engine's connection (vLLM aborts the generation).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway import deadlines, pipeline
from gateway.api.errors import error_response
from gateway.errors import ClientGone, GatewayError
from gateway.observability.request_context import RequestContext
from gateway.responses.bridge import RESPONSES, create_response

log = logging.getLogger("gateway.api")

ENDPOINTS = {"/v1/chat/completions": pipeline.CHAT, "/v1/completions": pipeline.COMPLETIONS,
             "/v1/responses": RESPONSES}  # the Responses bridge onto the chat pipeline (gateway/responses)


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
        except ClientGone:
            return
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
        state = self.app.state.gateway
        caller = pipeline.identify(state, _header(scope, b"authorization"))
        held = pipeline.hold(state, caller)  # uploads count against the tenant's concurrency
        try:
            settings = state.settings
            raw = await _read_body(scope, receive, settings.max_body_bytes, settings.body_read_timeout_s,
                                   settings.body_read_grace_s, settings.body_read_min_bytes_per_s)
            # Cheap scans before any parse: `[{},{},...]` costs ~30x its size to parse, and a list of a
            # million numbers holds the event loop for a tenth of a second even in orjson.
            if (raw.count(b"{") + raw.count(b"[") > settings.max_json_containers
                    or raw.count(b",") > settings.max_json_items):
                raise GatewayError(400, f"The request body has more than {settings.max_json_containers} JSON "
                                   f"objects and arrays or {settings.max_json_items} items.",
                                   code="request_too_complex")
            if endpoint is RESPONSES:
                return await create_response(state, caller, raw, context, lambda: _disconnected(receive), held)
            return await pipeline.serve(state, endpoint, caller, raw, context, lambda: _disconnected(receive),
                                        held)
        except BaseException:
            if held is not None:  # the outcome has it once there is one; releasing twice is a no-op
                held.release()
            raise


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _read_body(scope: Scope, receive: Receive, limit: int, timeout_s: float, grace_s: float,
                     min_bytes_per_s: int) -> bytes:
    """The body, within a deadline that scales with its declared length (a few hundred bytes get a few
    seconds, not the whole `timeout_s`: a slow upload is a held connection)."""
    declared = _header(scope, b"content-length")
    if declared is not None and declared.isascii() and declared.isdigit():
        length = int(declared)
        if length > limit:
            raise _too_large(limit)
        timeout_s = min(timeout_s, grace_s + length / min_bytes_per_s)
    parts: list[bytes] = []
    size = 0
    try:
        with deadlines.timeout(timeout_s):  # a slow upload holds a connection, never for ever
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone()
                parts.append(message.get("body", b""))
                size += len(parts[-1])
                if size > limit:
                    raise _too_large(limit)
                if not message.get("more_body"):
                    return parts[0] if len(parts) == 1 else b"".join(parts)
    except TimeoutError:
        raise GatewayError(408, f"The request body did not arrive within {timeout_s:.3g} s.",
                           code="request_timeout", headers={"Connection": "close"}) from None


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")


def _header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope["headers"]:
        if name == wanted:
            return value.decode("latin-1")
    return None
