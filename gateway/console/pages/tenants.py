"""Tenants: environment, attestations (each license condition attested or missing), limits, quota used
and left this day and month; one page of /admin/tenants at a time."""

from __future__ import annotations

from starlette.responses import Response

from gateway.console.app import Visit

PAGE_SIZE = 20


async def show(visit: Visit) -> Response:
    tenant = visit.param("tenant")
    after = visit.param("after")
    body = await visit.get("/admin/tenants", {"tenant": tenant, "after": after, "limit": str(PAGE_SIZE)}, "tenants")
    return visit.render("tenants.html", title="Tenants", current="tenants", tenants=body["data"], tenant=tenant,
                        next_after=body["last_id"] if body["has_more"] else None, paged=bool(after))
