"""Models: every registry variant the caller may know of (an admin: all), with license, conditions,
hardware, context, prompt format and backends' health; filtered and searched by /admin/models."""

from __future__ import annotations

from starlette.responses import Response

from gateway.console.app import Visit


async def show(visit: Visit) -> Response:
    filters = {name: visit.param(name) for name in ("q", "family", "commercial_use")}
    body = await visit.get("/admin/models", {**filters, "limit": "500"}, "models")
    return visit.render("models.html", title="Models", current="models", models=body["data"],
                        families=body["families"], filters=filters, truncated=body["has_more"])
