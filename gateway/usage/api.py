"""`GET /v1/organization/usage/completions`: OpenAI's usage API over the gateway's counters.

OpenAI's query parameters: start_time (required), end_time, bucket_width (1m/1h/1d), project_ids,
api_key_ids, models, group_by (project_id, api_key_id, model; plus our `license`), limit, page. A project
is a tenant. Admin keys see every tenant; any other key sees only its own tenant (asking for another one
is a 403). Left out: user_ids, batch and service_tier (the gateway has neither users nor batches: a
`group_by` on them is a 400), and the cached/audio/image token fields are always 0.
Our extra top-level field `gateway` says whether the counters are shared by all replicas (`redis`) or
this replica's alone (`process`), and shows the tenants' token quotas.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from starlette.datastructures import QueryParams

from gateway.errors import GatewayError
from gateway.usage import quota as quota_mod
from gateway.usage.counters import RETENTION_S, WIDTHS

if TYPE_CHECKING:
    from gateway.pipeline import GatewayState
    from gateway.tenancy.tenants import Caller

GROUPS = {"project_id": 0, "api_key_id": 1, "model": 2, "license": 3}  # index into a counter key
UNSUPPORTED_GROUPS = {"user_id", "batch", "service_tier"}
LIMITS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}  # OpenAI's default and maximum per width


def _bad(message: str, param: str) -> GatewayError:
    return GatewayError(400, message, param=param, code="invalid_value")


def _list(params: QueryParams, name: str) -> list[str]:
    values = params.getlist(name) + params.getlist(name + "[]")
    return [v for value in values for v in value.split(",") if v]


def _int(params: QueryParams, name: str, default: int | None = None) -> int | None:
    raw = params.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise _bad(f"`{name}` must be an integer, not {raw[:40]!r}.", name) from None


async def completions(state: "GatewayState", caller: "Caller", params: QueryParams) -> dict:
    start = _int(params, "start_time")
    if start is None:
        raise _bad("`start_time` is required (unix seconds, inclusive).", "start_time")
    if start < 0:
        raise _bad("`start_time` must be a unix time in seconds.", "start_time")
    now = int(time.time())
    end = _int(params, "end_time", now)
    if end <= start:
        raise _bad(f"`end_time` ({end}) must be after `start_time` ({start}).", "end_time")
    width = params.get("bucket_width", "1d")
    if width not in WIDTHS:
        raise _bad(f"`bucket_width` must be one of 1m, 1h, 1d, not {width[:20]!r}.", "bucket_width")
    groups = _list(params, "group_by")
    for group in groups:
        if group in UNSUPPORTED_GROUPS:
            raise _bad(f"`group_by={group}` is not supported by this gateway (it has no {group}s).", "group_by")
        if group not in GROUPS:
            raise _bad(f"Unknown `group_by` value {group[:40]!r}; use project_id, api_key_id, model or license.",
                       "group_by")
    default, maximum = LIMITS[width]
    limit = _int(params, "limit", default)
    if not 1 <= limit <= maximum:
        raise _bad(f"`limit` must be between 1 and {maximum} for bucket_width={width}, not {limit}.", "limit")
    size = WIDTHS[width]
    first = start // size * size
    page = params.get("page")
    if page is not None:
        if not page.isdigit() or int(page) < first or int(page) % size:
            raise _bad("`page` must be a `next_page` cursor of an earlier answer to the same query.", "page")
        first = int(page)
    projects = _list(params, "project_ids")
    tenant = caller.tenant.name
    if not caller.tenant.admin:
        others = [p for p in projects if p != tenant]
        if others:
            raise GatewayError(403, f"This key may read the usage of its own project (`{tenant}`) only, not "
                               f"`{others[0][:60]}`.", type="permission_error", param="project_ids",
                               code="forbidden_project")
        projects = [tenant]
    filters = [set(projects), set(_list(params, "api_key_ids")), set(_list(params, "models"))]
    count = min(limit, -(-(end - first) // size))
    starts = [first + i * size for i in range(count)]
    counts = await state.usage.read(width, starts)
    data = [{"object": "bucket", "start_time": s, "end_time": s + size,
             "results": _results(counts.get(s, {}).items(), filters, groups)} for s in starts]
    following = first + count * size
    has_more = following < end
    return {
        "object": "page", "data": data, "has_more": has_more, "next_page": str(following) if has_more else None,
        "gateway": {"counters": "redis" if state.usage.shared else "process",
                    "retention_s": RETENTION_S[width],
                    "quotas": await _quotas(state, caller, projects)},
    }


def _results(rows: Iterable, filters: list[set[str]], groups: list[str]) -> list[dict]:
    totals: dict[tuple, list[int]] = {}
    for key, (inp, out, n) in rows:
        if any(wanted and key[i] not in wanted for i, wanted in enumerate(filters)):
            continue
        group = tuple(key[GROUPS[g]] if g in groups else None for g in GROUPS)
        row = totals.setdefault(group, [0, 0, 0])
        row[0] += inp
        row[1] += out
        row[2] += n
    return [{
        "object": "organization.usage.completions.result",
        "input_tokens": inp, "output_tokens": out, "input_cached_tokens": 0, "input_audio_tokens": 0,
        "output_audio_tokens": 0, "num_model_requests": n,
        "project_id": project, "user_id": None, "api_key_id": key_id, "model": model, "batch": None,
        "license": license_,
    } for (project, key_id, model, license_), (inp, out, n) in sorted(totals.items(), key=lambda kv: str(kv[0]))]


async def _quotas(state: "GatewayState", caller: "Caller", projects: list[str]) -> dict:
    tenants = state.snapshot.tenants.tenants if state.snapshot.tenants is not None else {}
    out = {}
    for name, tenant in sorted(tenants.items()):
        if tenant.quotas and (not projects or name in projects) and (caller.tenant.admin or name == caller.tenant.name):
            out[name] = quota_mod.status(tenant.quotas, await state.quotas.periods(name))
    return out
