"""The database-backed admin API: API keys (`/admin/keys`) and policy decisions (`/admin/decisions`).

Admin keys may do everything; any other key may list its own tenant's keys and decisions (the console
shows a tenant its own). Changes are made with an admin key and recorded as admin events (which key,
when, what: gateway/store/keys.py). Parameters are parsed strictly (an unknown or repeated one is a
400), pages and date ranges are capped, and a database that cannot be reached is a 503, never a 500.
"""

from __future__ import annotations

import asyncio
import re
from datetime import datetime, timezone

import orjson
from fastapi import APIRouter, Header, Request
from sqlalchemy import exc as sa_exc
from starlette.datastructures import QueryParams

from gateway import pipeline
from gateway.api.callers import request_caller
from gateway.api.json import JSONResponse
from gateway.errors import GatewayError
from gateway.store.responses import StoreUnavailable
from gateway.tenancy import keys as key_list
from gateway.tenancy.auth import require_admin
from gateway.tenancy.tenants import Caller

router = APIRouter()

_DIGITS = re.compile(r"[0-9]{1,12}")
DECISIONS = ("allow", "deny", "substitute", "not_found")
_DOWN = (StoreUnavailable, sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, sa_exc.DBAPIError, OSError,
         asyncio.TimeoutError, ConnectionError)


def _state(request: Request) -> pipeline.GatewayState:
    return request.app.state.gateway


def _bad(message: str, param: str | None, code: str = "invalid_value") -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def _unavailable(state: pipeline.GatewayState) -> GatewayError:
    return GatewayError(503, "The database cannot be reached right now; retry shortly.",
                        type="service_unavailable_error", code="database_unavailable",
                        headers={"Retry-After": str(state.settings.retry_after_s)})


def _params(params: QueryParams, allowed: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in params.multi_items():
        if name not in allowed:
            raise _bad(f"Unrecognized request argument supplied: {name[:60]!r}.", name[:60], "unknown_parameter")
        if name in out:
            raise _bad(f"`{name}` may be given once.", name)
        out[name] = value
    return out


def _int(value: str | None, name: str, default: int) -> int:
    if value is None:
        return default
    if not _DIGITS.fullmatch(value):
        raise _bad(f"`{name}` must be a whole number of at most 12 ASCII digits, not {value[:40]!r}.", name)
    return int(value)


def _time(value: str | None, name: str) -> float | None:
    """Unix seconds (ASCII digits) or an ISO 8601 time (UTC unless it names an offset)."""
    if value is None:
        return None
    if _DIGITS.fullmatch(value):
        return float(value)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _bad(f"`{name}` must be unix seconds or an ISO 8601 time, not {value[:40]!r}.", name) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def _own_tenant(caller: Caller, asked: str | None, param: str = "tenant") -> str | None:
    """An admin may ask for any tenant (None: all); any other key for its own only (the default)."""
    if caller.tenant.admin:
        return asked
    if asked is not None and asked != caller.tenant.name:
        raise GatewayError(403, f"This key may read its own tenant (`{caller.tenant.name}`) only, not "
                           f"`{asked[:60]}`.", type="permission_error", param=param, code="forbidden_tenant")
    return caller.tenant.name


async def _body(request: Request) -> dict:
    raw = await request.body()
    if not raw.strip():
        return {}
    if len(raw) > 64 * 1024:
        raise GatewayError(413, "The request body is larger than 65536 bytes.", code="request_too_large")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _bad("The request body is not valid JSON.", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.", None, "invalid_json")
    return body


def _field(body: dict, name: str, kind: type | tuple, required: bool = False):  # type: ignore[no-untyped-def]
    value = body.get(name)
    if value is None:
        if required:
            raise _bad(f"`{name}` is required.", name, "missing_required_parameter")
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        what = "a string" if kind is str else "a whole number"
        raise _bad(f"`{name}` must be {what}.", name, "invalid_type")
    return value


@router.post("/admin/keys")
async def create_key(request: Request, authorization: str | None = Header(None)) -> JSONResponse:
    state = _state(request)
    caller = request_caller(request, authorization)
    require_admin(caller)
    body = await _body(request)
    unknown = sorted(set(body) - {"tenant", "name", "expires_at"})
    if unknown:
        raise _bad(f"Unrecognized request argument supplied: {unknown[0][:60]!r}.", unknown[0][:60],
                   "unknown_parameter")
    tenant = _field(body, "tenant", str, required=True)
    name = _field(body, "name", str) or ""
    expires_at = _field(body, "expires_at", int)
    tenants = state.snapshot.tenants
    if tenants is None or tenant not in tenants.tenants:
        raise _bad(f"No tenant `{tenant[:60]}` in the tenants file: a key belongs to a tenant declared there.",
                   "tenant", "unknown_tenant")
    try:
        made = await state.store.keys.create(tenant, name, expires_at, by=caller.key_id)
    except _DOWN:
        raise _unavailable(state) from None
    return JSONResponse({**key_list.public(made.record), "key": made.key}, status_code=201)


@router.get("/admin/keys")
async def list_keys(request: Request, authorization: str | None = Header(None)) -> JSONResponse:
    state = _state(request)
    caller = request_caller(request, authorization)
    params = _params(request.query_params, {"tenant", "limit", "after"})
    tenant = _own_tenant(caller, params.get("tenant"))
    try:
        page = await key_list.list_keys(state.snapshot.tenants, state.store.keys, tenant=tenant,
                                        limit=_int(params.get("limit"), "limit", 20), after=params.get("after"))
    except _DOWN:
        raise _unavailable(state) from None
    return JSONResponse(page.body())


async def _database_key(state: pipeline.GatewayState, key_id: str):  # type: ignore[no-untyped-def]
    try:
        record = await state.store.keys.get(key_id)
    except _DOWN:
        raise _unavailable(state) from None
    if record is not None:
        return record
    if key_list.is_file_key(state.snapshot.tenants, key_id):
        raise GatewayError(409, f"Key `{key_id}` is in the tenants file, which the API does not change: remove "
                           "its hash from the file and reload.", param="id", code="key_read_only")
    raise GatewayError(404, f"No API key `{key_id[:60]}`.", param="id", code="key_not_found")


@router.post("/admin/keys/{key_id}/revoke")
async def revoke_key(key_id: str, request: Request, authorization: str | None = Header(None)) -> JSONResponse:
    state = _state(request)
    caller = request_caller(request, authorization)
    require_admin(caller)
    await _database_key(state, key_id)
    try:
        record = await state.store.keys.revoke(key_id, by=caller.key_id)
        await state.store.sessions.delete_for_key(key_id)  # its console sessions end with it
    except _DOWN:
        raise _unavailable(state) from None
    assert record is not None
    return JSONResponse(key_list.public(record))


@router.post("/admin/keys/{key_id}/rotate")
async def rotate_key(key_id: str, request: Request, authorization: str | None = Header(None)) -> JSONResponse:
    state = _state(request)
    caller = request_caller(request, authorization)
    require_admin(caller)
    body = await _body(request)
    unknown = sorted(set(body) - {"grace_seconds"})
    if unknown:
        raise _bad(f"Unrecognized request argument supplied: {unknown[0][:60]!r}.", unknown[0][:60],
                   "unknown_parameter")
    grace = _field(body, "grace_seconds", int) or 0
    await _database_key(state, key_id)
    try:
        made = await state.store.keys.rotate(key_id, grace, by=caller.key_id)
    except _DOWN:
        raise _unavailable(state) from None
    assert made is not None
    return JSONResponse({**key_list.public(made.record), "key": made.key}, status_code=201)


@router.get("/admin/decisions")
async def decisions(request: Request, authorization: str | None = Header(None)) -> JSONResponse:
    state = _state(request)
    caller = request_caller(request, authorization)
    params = _params(request.query_params, {"request_id", "tenant", "model", "decision", "since", "until",
                                            "limit", "cursor"})
    decision = params.get("decision")
    if decision is not None and decision not in DECISIONS:
        raise _bad(f"`decision` must be one of {', '.join(DECISIONS)}, not {decision[:40]!r}.", "decision")
    try:
        page = await state.store.search_decisions(
            request_id=params.get("request_id"), tenant=_own_tenant(caller, params.get("tenant")),
            model=params.get("model"), decision=decision, since=_time(params.get("since"), "since"),
            until=_time(params.get("until"), "until"), limit=_int(params.get("limit"), "limit", 50),
            cursor=params.get("cursor"))
    except _DOWN:
        raise _unavailable(state) from None
    return JSONResponse({"object": "list", "data": [{"object": "policy.decision", **item} for item in page.data],
                         "next_cursor": page.next_cursor})
