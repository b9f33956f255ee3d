"""Policy: the tenant x model matrix from /admin/policy (gateway.policy.decide, as `gateway policy
explain`): each cell's verdict, rule, reason and the license conditions attested or missing. One tenant
(a tenant's own key, or an admin who picked one) reads as a list with every reason written out."""

from __future__ import annotations

from starlette.responses import Response

from gateway.console.app import Visit

TENANTS_PER_PAGE = 10


async def show(visit: Visit) -> Response:
    tenant = visit.param("tenant")
    after = visit.param("after")
    body = await visit.get("/admin/policy", {"tenant": tenant, "after": after, "limit": str(TENANTS_PER_PAGE)},
                           "policy")
    cells = {(cell["tenant"], cell["model"]): cell for cell in body["data"]}
    names: list[str] = []
    if visit.admin:
        names = [t["name"] for t in (await visit.get("/admin/tenants", {"limit": "100"}, "tenants"))["data"]]
    single = len(body["tenants"]) == 1 and (bool(tenant) or not visit.admin)
    return visit.render("policy.html", title="Policy", current="policy", tenants=body["tenants"],
                        models=body["models"], cells=cells, tenant=tenant, names=names, single=single,
                        next_after=body["last_id"] if body["has_more"] else None, paged=bool(after))
