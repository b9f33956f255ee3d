"""Stored responses, read back: `GET /v1/responses/{id}`, `DELETE /v1/responses/{id}` and
`GET /v1/responses/{id}/input_items` (OpenAI's paginated list).

Every lookup is scoped to the caller's tenant: another tenant's id is the same 404 as an unknown one,
never a 403 that would confirm it exists. Query parameters are strict: an unknown one, a repeated one or
a malformed value is a 400 naming it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

from starlette.datastructures import QueryParams

from gateway.errors import GatewayError
from gateway.responses.errors import store_unavailable
from gateway.responses.store import ResponseStore

log = logging.getLogger("gateway.responses")
T = TypeVar("T")

_RETRIEVE = frozenset({"include", "include[]", "stream", "starting_after", "include_obfuscation"})
_LIST = frozenset({"limit", "order", "after", "include", "include[]"})
_BOOLS = {"true": True, "false": False}


async def retrieve(store: ResponseStore, tenant: str, response_id: str, query: QueryParams) -> dict[str, Any]:
    params = _strict(query, _RETRIEVE)
    _refuse_include(query)
    if _bool(params, "stream"):
        raise GatewayError(400, "Unsupported parameter 'stream': a stored response is returned whole here; "
                           "retrieve it without stream.", param="stream", code="unsupported_parameter")
    _bool(params, "include_obfuscation")
    _int(params, "starting_after", None, 0, 10**9)
    stored = await _reached(store.get(tenant, response_id))
    if stored is None:
        raise not_found(response_id)
    return stored.response


async def delete(store: ResponseStore, tenant: str, response_id: str, query: QueryParams) -> dict[str, Any]:
    _strict(query, frozenset())
    if not await _reached(store.delete(tenant, response_id)):
        raise not_found(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


async def input_items(store: ResponseStore, tenant: str, response_id: str, query: QueryParams) -> dict[str, Any]:
    params = _strict(query, _LIST)
    _refuse_include(query)
    limit = _int(params, "limit", 20, 1, 100)
    order = params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise GatewayError(400, f"Invalid 'order': expected 'asc' or 'desc', got {order[:40]!r}.", param="order",
                           code="invalid_value")
    stored = await _reached(store.get(tenant, response_id))
    if stored is None:
        raise not_found(response_id)
    items = stored.input_items if order == "asc" else stored.input_items[::-1]
    start = 0
    after = params.get("after")
    if after is not None:
        positions = [index for index, item in enumerate(items) if item.get("id") == after]
        if not positions:
            raise GatewayError(400, f"Invalid 'after': no input item with id '{after[:80]}' in this response.",
                               param="after", code="invalid_value")
        start = positions[0] + 1
    page = items[start:start + limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(items)}


async def _reached(call: Awaitable[T]) -> T:
    try:
        return await call
    except Exception:
        log.exception("the response store failed")
        raise store_unavailable() from None


def not_found(response_id: str) -> GatewayError:
    return GatewayError(404, f"Response with id '{response_id[:100]}' not found.", param="response_id",
                        code="response_not_found")


def _strict(query: QueryParams, known: frozenset[str]) -> Mapping[str, str]:
    for name in query.keys():
        if name not in known:
            raise GatewayError(400, f"Unrecognized request argument supplied: {name[:60]}", param=name[:60],
                               code="unknown_parameter")
        if not name.startswith("include") and len(query.getlist(name)) > 1:
            raise GatewayError(400, f"Invalid '{name}': given more than once.", param=name, code="invalid_value")
    return query


def _refuse_include(query: QueryParams) -> None:
    for value in query.getlist("include") + query.getlist("include[]"):
        if not value:
            continue
        raise GatewayError(400, f"Unsupported value in 'include': {value[:60]!r} is output of tools, images, "
                           "reasoning or logprobs, which responses here do not hold.", param="include",
                           code="unsupported_parameter")


def _bool(params: Mapping[str, str], name: str) -> bool:
    value = params.get(name)
    if value is None:
        return False
    if value not in _BOOLS:
        raise GatewayError(400, f"Invalid type for '{name}': expected a boolean.", param=name, code="invalid_type")
    return _BOOLS[value]


def _int(params: Mapping[str, str], name: str, default: int | None, low: int, high: int) -> int | None:
    value = params.get(name)
    if value is None:
        return default
    if not (value.isascii() and value.isdigit() and len(value) <= 10):
        raise GatewayError(400, f"Invalid type for '{name}': expected an integer.", param=name, code="invalid_type")
    number = int(value)
    if not low <= number <= high:
        raise GatewayError(400, f"Invalid '{name}': expected a value between {low} and {high}, got {number}.",
                           param=name, code="invalid_value")
    return number
