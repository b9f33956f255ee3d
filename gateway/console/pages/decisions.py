"""Decisions: the policy decisions (allow, deny, substitute, not found) searched by request id, tenant,
model, outcome and time, newest first, one page of /admin/decisions at a time (its `next_cursor`)."""

from __future__ import annotations

from datetime import datetime, timezone
from urllib.parse import urlencode

from starlette.responses import Response

from gateway.console.app import Visit

PAGE_SIZE = 50
OUTCOMES = ("allow", "deny", "substitute", "not_found")
FIELDS = ("request_id", "tenant", "model", "decision", "since", "until")


async def show(visit: Visit) -> Response:
    filters = {name: visit.param(name) for name in FIELDS}
    params = {name: filters[name] for name in ("request_id", "tenant", "model", "decision")}
    for name in ("since", "until"):
        if filters[name]:
            seconds = _seconds(filters[name])
            if seconds is None:
                return visit.render("error.html", 400, title="Bad request",
                                    message=f"`{name}` must be a date and time (UTC), as 2024-05-01T13:00.")
            params[name] = str(seconds)
    cursor = visit.param("cursor")
    body = await visit.get("/admin/decisions", {**params, "cursor": cursor, "limit": str(PAGE_SIZE)}, "decisions")
    shown = {name: value for name, value in filters.items() if value}
    following = body.get("next_cursor")
    return visit.render("decisions.html", title="Decisions", current="decisions", decisions=body["data"],
                        filters=filters, outcomes=OUTCOMES, paged=bool(cursor),
                        first_query=urlencode(shown),
                        next_query=urlencode({**shown, "cursor": following}) if following else None)


def _seconds(text: str) -> int | None:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return int((moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp())
