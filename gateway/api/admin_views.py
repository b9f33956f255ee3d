"""Read-only admin views of the configuration, as JSON: who am I, the models, the policy matrix, the tenants.

    GET /admin/me        the calling key: tenant, key id, admin or not
    GET /admin/models    every registry variant: license and its conditions, hardware, context, prompt
                         format, backends and their health (filters q, family, commercial_use)
    GET /admin/policy    the tenant x model matrix: verdict, rule, reason, served model, and the license
                         conditions attested or missing (gateway.policy.decide, as `gateway policy explain`)
    GET /admin/tenants   environment, attestations, limits, quota used and left this day and month

An admin key sees every tenant; any other key only its own (naming another is a 403), and never a model
hidden from it (its lists or another tenant's `private_to`): to it such a model does not exist, as in its
404s. Lists are bounded pages (`limit`, `after` = the last id of the previous page, `has_more`,
`last_id`). Parameters are parsed strictly: an unknown or repeated one is a 400 naming it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from fastapi import APIRouter, Header, Request
from starlette.datastructures import QueryParams

from gateway.api.callers import request_caller
from gateway.api.json import JSONResponse
from gateway.errors import GatewayError
from gateway.policy.decide import Decision
from gateway.registry import Model, Registry
from gateway.routing.report import availability, backend_report
from gateway.tenancy.tenants import Caller, Tenant
from gateway.admission import quota as quota_mod

router = APIRouter()

_DIGITS = re.compile(r"[0-9]{1,6}")
COMMERCIAL_USES = ("yes", "conditional", "no")
PAGE = {"models": (100, 500), "policy": (20, 100), "tenants": (20, 100)}  # default and maximum `limit`


def _state(request: Request):  # gateway.pipeline.GatewayState
    return request.app.state.gateway


@router.get("/admin/me")
async def me(request: Request, authorization: str | None = Header(None)) -> JSONResponse:
    caller = request_caller(request, authorization)
    _strict(request.query_params, set())
    tenant = caller.tenant
    return JSONResponse({"object": "caller", "tenant": tenant.name, "key_id": caller.key_id,
                         "admin": tenant.admin, "environment": tenant.environment.value})


@router.get("/admin/models")
async def models(request: Request, authorization: str | None = Header(None)) -> JSONResponse:
    state = _state(request)
    caller = request_caller(request, authorization)
    params = request.query_params
    _strict(params, {"q", "family", "commercial_use", "limit", "after"})
    snapshot = state.snapshot
    registry = snapshot.registry
    query = (params.get("q") or "").strip().lower()
    family = params.get("family")
    use = params.get("commercial_use")
    if use is not None and use not in COMMERCIAL_USES:
        raise _bad(f"`commercial_use` must be one of {', '.join(COMMERCIAL_USES)}, not {use[:40]!r}.",
                   "commercial_use")
    health = {row["id"]: row for row in backend_report(state)}
    rows = []
    for model in registry.models.values():
        decision = None if caller.tenant.admin else snapshot.decide(caller.tenant, model)
        if decision is not None and decision.hidden:
            continue  # to this tenant the model does not exist
        license_ = registry.license_of(model)
        if family and model.family != family:
            continue
        if use and license_.commercial_use.value != use:
            continue
        if query and not any(query in text.lower() for text in (model.id, model.family, model.hf_repo,
                                                                 model.license, license_.name)):
            continue
        rows.append(_model_row(registry, model, state.fleet, health, caller, decision))
    page, has_more = _page(rows, "id", params, *PAGE["models"])
    families = sorted({m.family for m in registry.models.values()
                       if caller.tenant.admin or not snapshot.decide(caller.tenant, m).hidden})
    return JSONResponse({"object": "list", "data": page, "has_more": has_more,
                         "last_id": page[-1]["id"] if page else None, "families": families,
                         "licenses": _licenses(registry)})


@router.get("/admin/policy")
async def policy(request: Request, authorization: str | None = Header(None)) -> JSONResponse:
    state = _state(request)
    caller = request_caller(request, authorization)
    params = request.query_params
    _strict(params, {"tenant", "model", "limit", "after"}, lists={"tenant", "model"})
    snapshot = state.snapshot
    registry = snapshot.registry
    tenants, has_more = _page_tenants(snapshot, caller, params, *PAGE["policy"])
    wanted_models = set(_list(params, "model"))
    unknown = sorted(wanted_models - set(registry.models))
    if unknown:
        raise GatewayError(404, f"No model `{unknown[0][:80]}` in the registry.", param="model",
                           code="model_not_found")
    cells = []
    for model in registry.models.values():
        if wanted_models and model.id not in wanted_models:
            continue
        for tenant in tenants:
            decision = snapshot.decide(tenant, model)
            if decision.hidden and not caller.tenant.admin:
                continue  # a model hidden from this tenant is not shown to it, not even as hidden
            cells.append(_cell(registry, tenant, model, decision))
    shown = {cell["model"] for cell in cells}
    return JSONResponse({
        "object": "list",
        "tenants": [_tenant_head(t) for t in tenants],
        "models": [{"id": m.id, "family": m.family, "license": m.license,
                    "commercial_use": registry.license_of(m).commercial_use.value}
                   for m in registry.models.values() if m.id in shown],
        "data": cells, "has_more": has_more, "last_id": tenants[-1].name if tenants else None,
    })


@router.get("/admin/tenants")
async def tenants(request: Request, authorization: str | None = Header(None)) -> JSONResponse:
    state = _state(request)
    caller = request_caller(request, authorization)
    params = request.query_params
    _strict(params, {"tenant", "limit", "after"}, lists={"tenant"})
    snapshot = state.snapshot
    page, has_more = _page_tenants(snapshot, caller, params, *PAGE["tenants"])
    conditions = [(license_id, c) for license_id, lic in snapshot.registry.licenses.items() for c in lic.conditions]
    keys: dict[str, int] = {}
    if snapshot.tenants is not None:
        for found in snapshot.tenants.by_key_hash.values():
            keys[found.tenant.name] = keys.get(found.tenant.name, 0) + 1
    data = []
    for tenant in page:
        quotas = tenant.quotas
        data.append({
            **_tenant_head(tenant),
            "admin": tenant.admin,
            "conditions": [{"license": license_id, "id": c.id, "text": c.text, "attested": c.id in tenant.attestations}
                           for license_id, c in conditions],
            "allow_models": list(tenant.allow_models), "deny_models": list(tenant.deny_models),
            "limits": {"rpm": tenant.limits.rpm, "tpm": tenant.limits.tpm,
                       "max_concurrent": tenant.limits.max_concurrent,
                       "tokens_per_day": quotas.tokens_per_day, "tokens_per_month": quotas.tokens_per_month},
            # The same figures as the usage API's `gateway.quotas` (one quota counter, one answer).
            "quotas": quota_mod.status(quotas, await state.quotas.periods(tenant.name)) if quotas else {},
            "engine_extras": sorted(tenant.engine_extras), "default_max_tokens": tenant.default_max_tokens,
            "file_keys": keys.get(tenant.name, 0),
        })
    return JSONResponse({"object": "list", "data": data, "has_more": has_more,
                         "last_id": page[-1].name if page else None})


def _model_row(registry: Registry, model: Model, fleet, health: dict[str, dict], caller: Caller,
               decision: Decision | None) -> dict:
    license_ = registry.license_of(model)
    gpu = model.hardware.min_gpu
    backends = []
    for backend in model.backends:
        row = health.get(backend.id, {})
        entry = {"id": backend.id, "engine": backend.engine.value, "engine_version": backend.engine_version,
                 "role": backend.role.value, "healthy": row.get("healthy"), "ejected": row.get("ejected"),
                 "probe_failure": row.get("probe_failure")}
        if caller.tenant.admin:  # where the engines are is the operator's business
            entry["url"] = backend.base_url
        backends.append(entry)
    return {
        "id": model.id, "family": model.family, "hf_repo": model.hf_repo, "params_b": model.params_b,
        "architecture": model.architecture, "context_length": model.context_length,
        "prompt_format": model.prompt_format, "license": model.license, "license_name": license_.name,
        "commercial_use": license_.commercial_use.value,
        "conditions": [{"id": c.id, "text": c.text} for c in license_.conditions],
        "hardware": {"fp16_weight_gb": model.hardware.fp16_weight_gb,
                     "min_gpu": "none" if gpu.count == 0 else f"{gpu.count}x {gpu.type}",
                     "tensor_parallel_size": model.hardware.tensor_parallel_size,
                     "cpu_fallback_realistic": model.hardware.cpu_fallback_realistic},
        "commercial_twin": model.commercial_twin,
        "backends": backends, "availability": availability(model.backends, fleet),
        "decision": None if decision is None else _decision(decision),
    }


def _licenses(registry: Registry) -> dict:
    return {license_id: {"name": lic.name, "commercial_use": lic.commercial_use.value,
                         "url": str(lic.url) if lic.url else None,
                         "conditions": [{"id": c.id, "text": c.text} for c in lic.conditions]}
            for license_id, lic in registry.licenses.items()}


def _decision(decision: Decision) -> dict:
    return {"verdict": decision.verdict.value, "hidden": decision.hidden, "rule": decision.rule,
            "reason": decision.reason, "served_model": decision.served_model,
            "status": 404 if decision.hidden else 200 if decision.allowed else 403}


def _cell(registry: Registry, tenant: Tenant, model: Model, decision: Decision) -> dict:
    license_ = registry.license_of(model)
    return {"tenant": tenant.name, "model": model.id, **_decision(decision),
            "conditions": [{"id": c.id, "text": c.text, "attested": c.id in tenant.attestations}
                           for c in license_.conditions]}


def _tenant_head(tenant: Tenant) -> dict:
    return {"name": tenant.name, "environment": tenant.environment.value,
            "attestations": sorted(tenant.attestations), "substitutions": tenant.substitutions}


def _page_tenants(snapshot, caller: Caller, params: QueryParams, default: int, maximum: int
                  ) -> tuple[list[Tenant], bool]:
    """The tenants a page shows: by name; a non-admin caller's own alone (another named is a 403)."""
    named = _list(params, "tenant")
    own = caller.tenant.name
    if not caller.tenant.admin:
        others = [name for name in named if name != own]
        if others:
            raise GatewayError(403, f"This key may see its own tenant (`{own}`) only, not `{others[0][:60]}`.",
                               type="permission_error", param="tenant", code="forbidden_tenant")
        everyone = {own: caller.tenant}
    else:
        everyone = dict(snapshot.tenants.tenants) if snapshot.tenants is not None else {own: caller.tenant}
    if named:
        missing = [name for name in named if name not in everyone]
        if missing:
            raise GatewayError(404, f"No tenant `{missing[0][:60]}` in the tenants file.", param="tenant",
                               code="tenant_not_found")
        everyone = {name: everyone[name] for name in named}
    ordered = [everyone[name] for name in sorted(everyone)]
    rows, has_more = _page([{"id": t.name, "tenant": t} for t in ordered], "id", params, default, maximum)
    return [row["tenant"] for row in rows], has_more


def _page(rows: Sequence[dict], field: str, params: QueryParams, default: int, maximum: int
          ) -> tuple[list[dict], bool]:
    limit = _int(params, "limit", default)
    if not 1 <= limit <= maximum:
        raise _bad(f"`limit` must be between 1 and {maximum}, not {limit}.", "limit")
    after = params.get("after")
    start = 0
    if after is not None:
        index = next((i for i, row in enumerate(rows) if row[field] == after), None)
        if index is None:
            raise _bad("`after` must be the `last_id` of the previous page.", "after")
        start = index + 1
    return list(rows[start:start + limit]), start + limit < len(rows)


def _strict(params: QueryParams, allowed: set[str], lists: Iterable[str] = ()) -> None:
    seen: set[str] = set()
    repeatable = set(lists)
    for name, _ in params.multi_items():
        if name not in allowed:
            raise _bad(f"Unrecognized request argument supplied: {name[:60]!r}.", name[:60], "unknown_parameter")
        if name in seen and name not in repeatable:
            raise _bad(f"`{name}` may be given once.", name)
        seen.add(name)


def _list(params: QueryParams, name: str) -> list[str]:
    return [v for value in params.getlist(name) for v in value.split(",") if v]


def _int(params: QueryParams, name: str, default: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw):
        raise _bad(f"`{name}` must be a whole number of at most 6 ASCII digits, not {raw[:40]!r}.", name)
    return int(raw)


def _bad(message: str, param: str, code: str = "invalid_value") -> GatewayError:
    return GatewayError(400, message, param=param, code=code)
