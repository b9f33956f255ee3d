"""`GET /v1/organization/usage/completions`: OpenAI's usage API over the usage ledger (the database: its
minute, hour and day rollups, gateway/store/queries.py). Every replica answers the same: all of them
write to one database, and a replica writes its own last rows before it reads.

OpenAI's query parameters: start_time (required), end_time, bucket_width (1m/1h/1d), project_ids,
api_key_ids, models, batch, group_by (project_id, api_key_id, model; plus our `license`), limit, page. A
project is a tenant. Admin keys see every tenant; any other key sees only its own tenant (asking for
another one is a 403). The gateway has neither users nor batches: `user_ids` and a `group_by` on
user_id, batch or service_tier are a 400; `batch=false` is every request, `batch=true` none; the
cached/audio/image token fields are always 0.
Our extra parameter `include_errors=true` adds `num_errors` (requests answered with a status >= 400) to
each result; without it a result has exactly the fields it always had.
Our extra top-level field `gateway` says where the figures come from (`"counters": "database"`), how long
buckets of that width are kept (`retention_s`), and shows the tenants' token quotas.

Parameters are parsed strictly (a client's mistake is a 400 naming the parameter, never a 500 or a
silently different answer): integers are ASCII digits, at most 12 of them; an unknown parameter, or a
single-valued one given twice, is a 400.

What one call may cost is bounded. Each tenant has its own small limits on this endpoint, per replica
(GATEWAY_USAGE_API_RPM requests per minute, GATEWAY_USAGE_API_MAX_CONCURRENT calls at once; past them
OpenAI's 429 `rate_limit_exceeded` with Retry-After), and one call answers at most
GATEWAY_USAGE_API_MAX_ROWS results (each bucket counts one more): a page that would hold more stops
early, with `has_more: true` and a `next_page` cursor, as OpenAI pages. The database sums the rollups by
`group_by` (gateway/store/queries.py usage_page), so a result is a (bucket, group) and a day by tenant is
one page; what the database reads for it stays bounded by `limit` buckets of at most one rollup row per
dimension each, and the configuration bounds the dimensions (tenants x keys x models x endpoints). A
page holds at least one bucket, whose results the configuration bounds the same way.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from starlette.datastructures import QueryParams

from gateway.admission import quota as quota_mod
from gateway.admission.ratelimit import Limits, LocalRateLimiter, RateLimited
from gateway.errors import GatewayError
from gateway.store.ledger import WIDTHS
from gateway.store.responses import StoreUnavailable
from gateway.store.retention import ROLLUP_RETENTION_S

if TYPE_CHECKING:
    from gateway.settings import Settings
    from gateway.tenancy.tenants import Caller, Tenant


class UsageSource(Protocol):
    """The ledger's rollups (gateway.store.store.Store)."""

    async def usage_page(self, width: str, starts: list[int], max_entries: int | None, *,
                         tenants: Iterable[str] = (), key_ids: Iterable[str] = (),
                         models: Iterable[str] = (), group_by: Iterable[str] = ()) -> tuple[dict, int]: ...


class Rejections(Protocol):
    def rejected(self, tenant: str, limit: str) -> None: ...

# group_by's names, as the store names them (gateway/store/queries.py GROUP_COLUMNS, in a group's order)
GROUPS = {"project_id": "tenant", "api_key_id": "key_id", "model": "model", "license": "license"}
UNSUPPORTED_GROUPS = {"user_id", "batch", "service_tier"}
LIMITS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}  # OpenAI's default and maximum per width
SINGLE = {"start_time", "end_time", "bucket_width", "batch", "limit", "page", "include_errors"}
LISTS = {"project_ids", "user_ids", "api_key_ids", "models", "group_by"}  # also as `name[]`
_DIGITS = re.compile(r"[0-9]{1,12}")  # `\d` and int() take any script's digits; 12 digits: year 33658


class UsageApi:
    """The endpoint with its own per-tenant, per-replica limits (it is not generation: it has no tokens
    to charge, and must not spend the tenant's generation limits either)."""

    def __init__(self, settings: "Settings", source: UsageSource, quotas: Any, metrics: Rejections) -> None:
        """`quotas`: the quota counts shown beside the usage (LocalQuotas or RedisQuotas: `periods()`)."""
        self.limits = Limits(rpm=settings.usage_api_rpm, max_concurrent=settings.usage_api_max_concurrent)
        self.max_rows = settings.usage_api_max_rows
        self._limiter = LocalRateLimiter()
        self._source, self._quotas, self._metrics = source, quotas, metrics

    async def completions(self, tenants: Mapping[str, "Tenant"], caller: "Caller", params: QueryParams) -> dict:
        """`tenants`: the current configuration's (for the quotas shown)."""
        try:
            admission = self._limiter.admit_now(caller.tenant.name, self.limits, 0)
        except RateLimited as exc:
            self._metrics.rejected(caller.tenant.name, "usage_api")
            raise _refusal(exc, self.limits) from None
        try:
            return await completions(self._source, self._quotas, tenants, caller, params, self.max_rows)
        except StoreUnavailable:
            raise GatewayError(503, "The usage ledger (the database) cannot be read right now; retry shortly. "
                               "Requests are still served and recorded.", type="service_unavailable_error",
                               code="database_unavailable", headers={"Retry-After": "5"}) from None
        finally:
            admission.settle()


def _refusal(exc: RateLimited, limits: Limits) -> GatewayError:
    if exc.limit == "concurrency":
        what = f"{limits.max_concurrent} calls at a time per project"
    else:
        what = f"{limits.rpm} requests per minute per project"
    headers = {name: value for name, value in exc.headers.items() if name.startswith("retry-after")}
    return GatewayError(429, f"Rate limit reached for the usage API ({what}). Retry in {exc.retry_after_s}s.",
                        type="rate_limit_error", code="rate_limit_exceeded", headers=headers)


def _bad(message: str, param: str, code: str = "invalid_value") -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def _check_names(params: QueryParams) -> None:
    seen: set[str] = set()
    for name, _ in params.multi_items():
        base = name[:-2] if name.endswith("[]") else name
        if base in LISTS:
            continue
        if name not in SINGLE:
            raise _bad(f"Unrecognized request argument supplied: {name[:60]!r}.", name[:60], "unknown_parameter")
        if name in seen:
            raise _bad(f"`{name}` may be given once.", name)
        seen.add(name)


def _list(params: QueryParams, name: str) -> list[str]:
    values = params.getlist(name) + params.getlist(name + "[]")
    return [v for value in values for v in value.split(",") if v]


def _int(params: QueryParams, name: str, default: int | None = None) -> int | None:
    raw = params.get(name)
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw):
        raise _bad(f"`{name}` must be a whole number of at most 12 ASCII digits, not {raw[:40]!r}.", name)
    return int(raw)


def _bool(params: QueryParams, name: str) -> bool | None:
    raw = params.get(name)
    if raw is None or raw in ("true", "false"):
        return None if raw is None else raw == "true"
    raise _bad(f"`{name}` must be true or false, not {raw[:40]!r}.", name)


async def completions(source: UsageSource, quotas: Any, tenants: Mapping[str, "Tenant"], caller: "Caller",
                      params: QueryParams, max_rows: int | None = None) -> dict:
    _check_names(params)
    if _list(params, "user_ids"):
        raise _bad("`user_ids` is not supported by this gateway: it has no users (every result's user_id is "
                   "null).", "user_ids", "unsupported_parameter")
    start = _int(params, "start_time")
    if start is None:
        raise _bad("`start_time` is required (unix seconds, inclusive).", "start_time")
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
    only_batches = _bool(params, "batch")
    with_errors = bool(_bool(params, "include_errors"))
    default, maximum = LIMITS[width]
    limit = _int(params, "limit", default)
    if not 1 <= limit <= maximum:
        raise _bad(f"`limit` must be between 1 and {maximum} for bucket_width={width}, not {limit}.", "limit")
    size = WIDTHS[width]
    first = start // size * size
    page = _int(params, "page")
    if page is not None:
        if page < first or page % size:
            raise _bad("`page` must be a `next_page` cursor of an earlier answer to the same query.", "page")
        first = page
    projects = _list(params, "project_ids")
    tenant = caller.tenant.name
    if not caller.tenant.admin:
        others = [p for p in projects if p != tenant]
        if others:
            raise GatewayError(403, f"This key may read the usage of its own project (`{tenant}`) only, not "
                               f"`{others[0][:60]}`.", type="permission_error", param="project_ids",
                               code="forbidden_project")
        projects = [tenant]
    key_ids, models = _list(params, "api_key_ids"), _list(params, "models")
    filters = [set(projects), set(key_ids), set(models), set()]  # in a group's order; license: no filter
    count = max(0, min(limit, -(-(end - first) // size)))
    starts = [first + i * size for i in range(count)]
    if only_batches:  # no request here is a batch request: empty buckets, nothing to read
        counts, taken = {}, count
    else:  # the filters go to the database: a tenant's page reads its own rows only
        counts, taken = await source.usage_page(width, starts, max_rows, tenants=projects, key_ids=key_ids,
                                                models=models, group_by=[GROUPS[g] for g in groups])
    data = [{"object": "bucket", "start_time": s, "end_time": s + size,
             "results": _results(counts.get(s, {}).items(), filters, with_errors)} for s in starts[:taken]]
    following = first + taken * size
    has_more = following < end
    return {
        "object": "page", "data": data, "has_more": has_more, "next_page": str(following) if has_more else None,
        "gateway": {"counters": "database", "retention_s": ROLLUP_RETENTION_S[width],
                    "quotas": await _quotas(quotas, tenants, caller, projects)},
    }


def _results(rows: Iterable, filters: list[set[str]], with_errors: bool) -> list[dict]:
    """One result per group the database summed (a group: tenant, key id, model, license, None where
    not grouped by). The filters went to the database; they are checked again here on the grouped
    fields, so that no other tenant's figure can reach a page, whatever the query did."""
    out = []
    for group, (inp, out_tokens, n, errors) in sorted(rows, key=lambda kv: str(kv[0])):
        if any(wanted and value is not None and value not in wanted for value, wanted in zip(group, filters)):
            continue
        project, key_id, model, license_ = group
        result = {
            "object": "organization.usage.completions.result",
            "input_tokens": inp, "output_tokens": out_tokens, "input_cached_tokens": 0, "input_audio_tokens": 0,
            "output_audio_tokens": 0, "num_model_requests": n,
            "project_id": project, "user_id": None, "api_key_id": key_id, "model": model, "batch": None,
            "license": license_,
        }
        if with_errors:
            result["num_errors"] = errors
        out.append(result)
    return out


async def _quotas(quotas: Any, tenants: Mapping[str, "Tenant"], caller: "Caller", projects: list[str]) -> dict:
    out = {}
    for name, tenant in sorted(tenants.items()):
        if tenant.quotas and (not projects or name in projects) and (caller.tenant.admin or name == caller.tenant.name):
            out[name] = quota_mod.status(tenant.quotas, await quotas.periods(name))
    return out
