"""Plain-text tables for the command line: models, prompt formats, the tenants x models policy matrix."""

from __future__ import annotations

from collections import defaultdict

from gateway.policy.decide import Decision, Verdict, decide
from gateway.registry import Registry
from gateway.tenancy.tenants import Tenant, TenantDirectory

_MARKS = {Verdict.ALLOW: "allow", Verdict.DENY: "DENY", Verdict.SUBSTITUTE: "subst"}
# A model hidden by the tenant's lists (or private to others) is a 404 to it, a license denial a 403.
_HIDDEN = "hidden"
MATRIX_LEGEND = ("allow: served; subst: its commercial twin is served; DENY: 403, the license forbids it; "
                 "hidden: 404, the tenant's lists (or private_to) exclude it")


def format_model_table(registry: Registry, tenant: Tenant | None = None) -> str:
    """Every model; for a tenant only those it may see (as its /v1/models and 404s), with its decision."""
    header = ("id", "family", "params", "context", "license", "commercial", "min GPU", "backends")
    rows = [header + (f"tenant {tenant.name}",) if tenant else header]
    for model in registry.models.values():
        decision = decide(tenant, model, registry) if tenant else None
        if decision is not None and decision.hidden:
            continue
        gpu = model.hardware.min_gpu
        row = (
            model.id,
            model.family,
            f"{model.params_b:g}B",
            str(model.context_length),
            model.license,
            registry.license_of(model).commercial_use.value,
            "none" if gpu.count == 0 else f"{gpu.count}x {gpu.type}",
            ", ".join(f"{b.engine.value}:{b.role.value}" for b in model.backends) or "-",
        )
        rows.append(row + (_mark(decision),) if decision else row)
    return _table(rows)


def format_formats(registry: Registry) -> str:
    """Each prompt format, how chat reaches the engine with it, and the models that use it."""
    by_format: dict[tuple[str, str], list[str]] = defaultdict(list)
    for model in registry.models.values():
        if model.prompt_format == "none":
            route = "completions only" if not model.allow_chat_without_format else "chat via completions"
        else:
            route = "native chat" if model.native_chat_template else "chat via completions"
        by_format[(model.prompt_format, route)].append(model.id)
    rows = [("format", "chat route", "models")]
    rows += [(fmt, route, ", ".join(ids)) for (fmt, route), ids in sorted(by_format.items())]
    return _table(rows)


def format_matrix(registry: Registry, tenants: TenantDirectory) -> str:
    names = list(tenants.tenants)
    rows = [("model", "license", *names)]
    for model in registry.models.values():
        cells = [_mark(decide(tenants.tenants[n], model, registry)) for n in names]
        rows.append((model.id, model.license, *cells))
    envs = ", ".join(f"{n}={t.environment.value}" for n, t in tenants.tenants.items())
    return f"tenants: {envs}\n{MATRIX_LEGEND}\n" + _table(rows)


def _mark(decision: Decision) -> str:
    return _HIDDEN if decision.hidden else _MARKS[decision.verdict]


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
