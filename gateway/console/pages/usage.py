"""Usage: tokens over time, stacked by tenant, model or license, from the usage API; a range picker, the
totals under the chart, every (bucket, group) row, and the same rows as CSV."""

from __future__ import annotations

from datetime import datetime, timezone
from urllib.parse import urlencode

from starlette.responses import Response

from gateway.console.app import Visit
from gateway.console.series import GROUPS, RANGES, BadQuery, UsageQuery, fetch

ROWS_PER_PAGE = 100


async def show(visit: Visit) -> Response:
    try:
        query = UsageQuery.from_params(visit.request.query_params)
    except BadQuery as exc:
        return visit.render("error.html", 400, title="Bad request", message=str(exc))
    series = await fetch(visit.get, query)
    rows = series.rows()
    pages = max(1, -(-len(rows) // ROWS_PER_PAGE))
    try:
        number = min(max(1, int(visit.param("rows_page", "1"))), pages)
    except ValueError:
        number = 1
    links = query.link_params()
    today = datetime.now(timezone.utc).date().isoformat()
    return visit.render(
        "usage.html", title="Usage", current="usage", query=query, series=series, totals=series.totals(),
        grand=series.grand_total(), chart=series.chart(),
        rows=rows[(number - 1) * ROWS_PER_PAGE:number * ROWS_PER_PAGE],
        rows_page=number, rows_pages=pages, ranges=list(RANGES) + ["custom"], groups=list(GROUPS),
        link=lambda **extra: urlencode({**links, **extra}), csv_query=urlencode(links), today=today,
        group_label={"tenant": "Tenant", "model": "Model", "license": "License"}[query.group])


async def csv_download(visit: Visit) -> Response:
    try:
        query = UsageQuery.from_params(visit.request.query_params)
    except BadQuery as exc:
        return visit.render("error.html", 400, title="Bad request", message=str(exc))
    series = await fetch(visit.get, query)
    first = datetime.fromtimestamp(query.start, timezone.utc).strftime("%Y%m%dT%H%M")
    name = f"usage-{query.group}-{first}-{query.range}.csv"
    return Response(series.csv(), media_type="text/csv; charset=utf-8",
                    headers={"content-disposition": f'attachment; filename="{name}"'})
