"""The usage page's figures: which buckets a range picker means, the usage API pages that cover them, and
the chart series, tables and CSV made from those pages (sums of the API's own numbers, nothing else).
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any

WIDTH_S = {"1h": 3600, "1d": 86400}
MAX_BUCKETS = {"1h": 168, "1d": 31}  # the usage API's largest `limit` per width
RANGES = {"24h": ("1h", 24), "7d": ("1d", 7), "30d": ("1d", 30)}
GROUPS = {"tenant": "project_id", "model": "model", "license": "license"}
MAX_CUSTOM_DAYS = 400  # the usage API keeps day buckets this long
# Usage API pages one page view may read: each holds at least one bucket, so a preset range (31 buckets
# at most) is always read whole; a longer custom range may stop early, and the page says so. The API sums
# by the page's group in the database, so a preset range is one call unless buckets x groups passes its
# GATEWAY_USAGE_API_MAX_ROWS (2,000: e.g. 24 hours x 50 tenants is 1,224 results and one call).
MAX_CALLS = 31


class BadQuery(ValueError):
    """A range picker value the page cannot use; the message says which field."""


@dataclass(frozen=True)
class UsageQuery:
    range: str
    width: str
    start: int  # the first bucket's start (unix seconds)
    end: int  # exclusive
    group: str
    tenant: str = ""
    model: str = ""
    license: str = ""
    custom_from: str = ""
    custom_to: str = ""
    errors: bool = False  # ask for each result's `num_errors` too (the usage API's include_errors)

    @classmethod
    def from_params(cls, params: Any, now: float | None = None) -> "UsageQuery":
        now = time.time() if now is None else now
        picked = params.get("range", "24h") or "24h"
        group = params.get("group", "tenant") or "tenant"
        if group not in GROUPS:
            raise BadQuery(f"Group by tenant, model or license, not {group[:40]!r}.")
        filters = {name: (params.get(name) or "").strip() for name in ("tenant", "model", "license")}
        if picked in RANGES:
            width, count = RANGES[picked]
            size = WIDTH_S[width]
            start = int(now // size * size) - (count - 1) * size
            return cls(picked, width, start, int(now) + 1, group, **filters)
        if picked != "custom":
            raise BadQuery(f"Pick a range of 24h, 7d, 30d or custom, not {picked[:40]!r}.")
        first, last = _day(params.get("from"), "from"), _day(params.get("to"), "to")
        if last < first:
            raise BadQuery("The range's last day comes before its first.")
        days = (last - first).days + 1
        if days > MAX_CUSTOM_DAYS:
            raise BadQuery(f"A custom range spans at most {MAX_CUSTOM_DAYS} days, not {days}.")
        start = int(datetime(first.year, first.month, first.day, tzinfo=timezone.utc).timestamp())
        end = start + days * 86400
        return cls("custom", "1h" if days <= 2 else "1d", start, end, group, **filters,
                   custom_from=first.isoformat(), custom_to=last.isoformat())

    @property
    def starts(self) -> list[int]:
        size = WIDTH_S[self.width]
        return list(range(self.start, self.end, size))

    def api_params(self, page: str | None = None) -> list[tuple[str, str]]:
        groups = [GROUPS[self.group]] + (["license"] if self.license and self.group != "license" else [])
        params = [("start_time", str(self.start)), ("end_time", str(self.end)), ("bucket_width", self.width),
                  ("limit", str(MAX_BUCKETS[self.width])), ("group_by", ",".join(groups))]
        if self.tenant:
            params.append(("project_ids", self.tenant))
        if self.model:
            params.append(("models", self.model))
        if self.errors:
            params.append(("include_errors", "true"))
        if page:
            params.append(("page", page))
        return params

    def link_params(self) -> dict[str, str]:
        out = {"range": self.range, "group": self.group, "tenant": self.tenant, "model": self.model,
               "license": self.license}
        if self.range == "custom":
            out.update({"from": self.custom_from, "to": self.custom_to})
        return {name: value for name, value in out.items() if value}


def _day(raw: str | None, name: str) -> date:
    try:
        return date.fromisoformat((raw or "").strip())
    except ValueError:
        raise BadQuery(f"`{name}` must be a day as YYYY-MM-DD (UTC).") from None


@dataclass
class UsageSeries:
    query: UsageQuery
    # (bucket start, group value) -> [requests, input tokens, output tokens]
    cells: dict[tuple[int, str], list[int]] = field(default_factory=dict)
    truncated: bool = False  # more pages than one view may read: the figures stop early

    def add(self, start: int, group: str, requests: int, inp: int, out: int) -> None:
        cell = self.cells.setdefault((start, group), [0, 0, 0])
        cell[0] += requests
        cell[1] += inp
        cell[2] += out

    def totals(self) -> list[dict]:
        """Per group, the largest first."""
        sums: dict[str, list[int]] = {}
        for (_, group), (n, inp, out) in self.cells.items():
            row = sums.setdefault(group, [0, 0, 0])
            row[0] += n
            row[1] += inp
            row[2] += out
        rows = [{"group": g, "requests": n, "input_tokens": i, "output_tokens": o, "total_tokens": i + o}
                for g, (n, i, o) in sums.items()]
        return sorted(rows, key=lambda r: (-r["total_tokens"], r["group"]))

    def grand_total(self) -> dict:
        rows = self.totals()
        return {key: sum(r[key] for r in rows) for key in ("requests", "input_tokens", "output_tokens", "total_tokens")}

    def rows(self) -> list[dict]:
        """Every non-empty (bucket, group), oldest bucket first."""
        size = WIDTH_S[self.query.width]
        return [{"bucket_start": s, "bucket_end": s + size, "group": g, "requests": n, "input_tokens": i,
                 "output_tokens": o, "total_tokens": i + o}
                for (s, g), (n, i, o) in sorted(self.cells.items())]

    def chart(self) -> dict:
        """Chart.js data: one stacked dataset of total tokens per group, one label per bucket."""
        starts = self.query.starts
        index = {s: i for i, s in enumerate(starts)}
        datasets: dict[str, list[int]] = {row["group"]: [0] * len(starts) for row in self.totals()}
        for (s, g), (_, inp, out) in self.cells.items():
            if s in index:
                datasets[g][index[s]] += inp + out
        fmt = "%m-%d %H:%M" if self.query.width == "1h" else "%Y-%m-%d"
        labels = [datetime.fromtimestamp(s, timezone.utc).strftime(fmt) for s in starts]
        return {"labels": labels, "datasets": [{"label": g, "data": d} for g, d in datasets.items()]}

    def csv(self) -> str:
        out = io.StringIO()
        fields = ["bucket_start", "bucket_end", self.query.group, "requests", "input_tokens", "output_tokens",
                  "total_tokens"]
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(fields)
        for row in self.rows():
            writer.writerow([_iso(row["bucket_start"]), _iso(row["bucket_end"]), row["group"], row["requests"],
                             row["input_tokens"], row["output_tokens"], row["total_tokens"]])
        return out.getvalue()


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


async def fetch(get: Callable[[str, Any], Awaitable[Any]], query: UsageQuery,
                on_result: Callable[[dict], None] | None = None) -> UsageSeries:
    """Read the usage API page by page (`next_page`) for the query's range, at most MAX_CALLS pages;
    `on_result` sees every result object kept (for fields beyond tokens and requests)."""
    series = UsageSeries(query)
    key = GROUPS[query.group]
    page: str | None = None
    for _ in range(MAX_CALLS):
        body = await get("/v1/organization/usage/completions", query.api_params(page))
        for bucket in body.get("data", []):
            for result in bucket.get("results", []):
                if query.license and result.get("license") != query.license:
                    continue
                series.add(bucket["start_time"], str(result.get(key)), result.get("num_model_requests", 0),
                           result.get("input_tokens", 0), result.get("output_tokens", 0))
                if on_result is not None:
                    on_result(result)
        page = body.get("next_page") if body.get("has_more") else None
        if page is None:
            return series
    series.truncated = True
    return series
