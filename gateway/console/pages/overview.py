"""Overview: the last 24 hours by license class (commercial, conditional, non-commercial), backends up and
down, quota warnings. Usage from the usage API grouped by license; each license's class from
/admin/models; backends from /admin/backends (an admin) or the caller's models' backends (a tenant);
quotas from /admin/tenants."""

from __future__ import annotations

from dataclasses import replace

from starlette.responses import Response

from gateway.console.app import Visit
from gateway.console.series import UsageQuery, fetch

CLASSES = (("yes", "Commercial"), ("conditional", "Conditional"), ("no", "Non-commercial"))
QUOTA_WARNING = 0.8  # a quota this full is a warning
TENANT_PAGES = 10


async def show(visit: Visit) -> Response:
    # One usage API call: 24 hour buckets x the licenses used, summed by the database; `include_errors`
    # adds each result's error count (a gateway extra, not in OpenAI's result).
    query = replace(UsageQuery.from_params({"range": "24h", "group": "license"}), errors=True)
    errors: dict[str, int] = {}

    def count_errors(result: dict) -> None:
        errors[result["license"]] = errors.get(result["license"], 0) + result["num_errors"]

    usage = await fetch(visit.get, query, on_result=count_errors)
    models = await visit.get("/admin/models", {"limit": "500"}, "models")
    classes = {use: {"label": label, "requests": 0, "input_tokens": 0, "output_tokens": 0,
                     "errors": 0} for use, label in CLASSES}
    licenses = models["licenses"]
    for total in usage.totals():
        use = licenses.get(total["group"], {}).get("commercial_use", "no")
        row = classes[use]
        row["requests"] += total["requests"]
        row["input_tokens"] += total["input_tokens"]
        row["output_tokens"] += total["output_tokens"]
        row["errors"] += errors.get(total["group"], 0)
    if visit.admin:
        backends = (await visit.get("/admin/backends", None, "backends"))["data"]
        backend_rows = [{"id": b["id"], "model": b["model"], "engine": b["engine"], "role": b["role"],
                         "up": b["healthy"] and not b["ejected"], "why": b["probe_failure"]} for b in backends]
    else:
        backend_rows = [{"id": b["id"], "model": m["id"], "engine": b["engine"], "role": b["role"],
                         "up": bool(b["healthy"]) and not b["ejected"], "why": b["probe_failure"]}
                        for m in models["data"] for b in m["backends"]]
    warnings = [w async for w in _quota_warnings(visit)]
    return visit.render("overview.html", title="Overview", current="overview", classes=list(classes.values()),
                        since=query.start, truncated=usage.truncated, backends=backend_rows,
                        up=sum(b["up"] for b in backend_rows),
                        down=sum(not b["up"] for b in backend_rows), warnings=warnings)


async def _quota_warnings(visit: Visit):
    after = None
    for _ in range(TENANT_PAGES):
        body = await visit.get("/admin/tenants", {"limit": "100", "after": after}, "tenants")
        for tenant in body["data"]:
            for which, quota in tenant["quotas"].items():
                if quota["used"] >= QUOTA_WARNING * quota["limit"]:
                    yield {"tenant": tenant["name"], "which": which, **quota}
        if not body["has_more"]:
            return
        after = body["last_id"]
