"""Every failure leaves as OpenAI's `{"error": {...}}` envelope, never as a stack trace."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from gateway.api.json import JSONResponse
from starlette.exceptions import HTTPException

from gateway.errors import GatewayError

log = logging.getLogger("gateway.api")


def error_response(error: GatewayError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _gateway_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GatewayError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        message = f"Invalid method for URL ({request.method} {request.url.path})."
    else:
        message = str(exc.detail)
    err_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    code = "method_not_allowed" if exc.status_code == 405 else None
    return error_response(GatewayError(exc.status_code, message, type=err_type, code=code,
                                       headers=dict(exc.headers or {})))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(
        GatewayError(500, "The gateway had an internal error handling your request.", type="server_error")
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
