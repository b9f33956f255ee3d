"""Reading the ledger: usage buckets (the usage API), the usage report, and the current quota periods.
All of them read the rollups, so their cost follows the number of (bucket x dimension) rows, not the
number of requests; the report reads the ledger only for the parts of its period that are not whole
hours (at most two hours' rows, by the time index).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import orjson
from sqlalchemy import BigInteger, Table, and_, case, cast, func, select

from gateway.store.database import Database
from gateway.store.ledger import WIDTHS
from gateway.store.schema import ROLLUPS, usage_dims, usage_ledger

def _sum(expression):  # type: ignore[no-untyped-def]
    """PostgreSQL's sum of a bigint is a numeric (a Decimal per value in Python): keep it an integer."""
    return cast(func.sum(expression), BigInteger)


Key = tuple[str, str, str, str]  # tenant, key id, model (served), license
DAY_S, HOUR_S = 86400, 3600


async def usage_buckets(db: Database, width: str, starts: Sequence[int], *, tenants: Iterable[str] = (),
                        key_ids: Iterable[str] = (), models: Iterable[str] = ()) -> dict[int, dict[Key, list[int]]]:
    """{bucket start: {(tenant, key id, model, license): [input, output, requests]}}, every dimension's
    figures (the usage API reads usage_page(), grouped in SQL); buckets with nothing are left out. Empty
    filters mean all. The rollup rows are read as they are (their key is (bucket, dimension)) and summed here by
    the four key fields: no join and no text grouping in the database."""
    if width not in ROLLUPS:
        raise ValueError(f"width must be one of {', '.join(ROLLUPS)}, not {width!r}")
    if not starts:
        return {}
    table, d = ROLLUPS[width], usage_dims.c
    wanted = set(starts)
    filters = [(d.tenant, sorted(set(tenants))), (d.key_id, sorted(set(key_ids))), (d.model_served, sorted(set(models)))]
    dims_query = select(d.id, d.tenant, d.key_id, d.model_served, d.license)
    for column, values in filters:
        if values:
            dims_query = dims_query.where(column.in_(values))
    c = table.c
    query = select(c.bucket_start, c.dim_id, c.input_tokens, c.output_tokens, c.requests) \
        .where(c.bucket_start >= min(wanted), c.bucket_start <= max(wanted))
    filtered = any(values for _, values in filters)
    async with db.reading() as conn:
        if filtered:  # the matching dimensions first, then only their rows
            keys: dict[int, Key] = {row[0]: tuple(row[1:]) for row in (await conn.execute(dims_query)).all()}
            if not keys:
                return {}
            rows = (await conn.execute(query.where(c.dim_id.in_(sorted(keys))))).all()
        else:  # rows first: every dimension they name was committed before them, so the second read has it
            rows = (await conn.execute(query)).all()
            keys = {row[0]: tuple(row[1:]) for row in (await conn.execute(dims_query)).all()}
    out: dict[int, dict[Key, list[int]]] = {}
    for start, dim_id, inp, outp, n in rows:
        key = keys.get(dim_id)
        if key is None or start not in wanted:
            continue
        bucket = out.get(start)
        if bucket is None:
            bucket = out[start] = {}
        acc = bucket.get(key)
        if acc is None:
            bucket[key] = [inp, outp, n]
        else:
            acc[0] += inp
            acc[1] += outp
            acc[2] += n
    return out


GROUP_COLUMNS = ("tenant", "key_id", "model", "license")  # what a page may group by, in Key order
_DIM_OF = {"tenant": "tenant", "key_id": "key_id", "model": "model_served", "license": "license"}
Group = tuple[str | None, str | None, str | None, str | None]  # a Key with None for what is not grouped


async def usage_page(db: Database, width: str, starts: Sequence[int], max_entries: int | None, *,
                     tenants: Iterable[str] = (), key_ids: Iterable[str] = (), models: Iterable[str] = (),
                     group_by: Iterable[str] = ()) -> tuple[dict[int, dict[Group, list[int]]], int]:
    """{bucket start: {group: [input, output, requests, errors]}} for the first of the consecutive
    buckets `starts` whose grouped rows, one more per bucket, add up to at most `max_entries` (always at
    least one bucket), and how many buckets that is: the usage API pages on those. A group is a Key with
    None in the fields not in `group_by` (GROUP_COLUMNS); no `group_by`: one group per bucket. Empty
    filters mean all.

    The database sums the rollup rows by bucket and group (GROUP BY), so a page holds buckets x groups,
    not buckets x dimensions: a day by tenant is 24 x tenants rows, however many keys and models the
    tenants used. What the database reads to sum them is bounded anyway: at most the API's `limit`
    buckets (1,440 minutes, 168 hours or 31 days), each at most one rollup row per dimension, and the
    dimensions are bounded by the configuration (tenants x keys x models x endpoints); the usage API's
    per-tenant call rate and concurrency bound how often. What comes back, and what Python then handles,
    is bounded by `max_entries`: the query stops after max_entries + 1 grouped rows (LIMIT)."""
    if width not in ROLLUPS:
        raise ValueError(f"width must be one of {', '.join(ROLLUPS)}, not {width!r}")
    groups = set(group_by)
    if groups - set(GROUP_COLUMNS):
        raise ValueError(f"group_by must be among {', '.join(GROUP_COLUMNS)}, not {sorted(groups)}")
    if not starts:
        return {}, 0
    table, d = ROLLUPS[width], usage_dims.c
    c = table.c
    columns = [d[_DIM_OF[name]] for name in GROUP_COLUMNS if name in groups]
    wanted = sorted(set(starts))
    where = [c.bucket_start >= wanted[0], c.bucket_start <= wanted[-1]]
    for column, values in ((d.tenant, tenants), (d.key_id, key_ids), (d.model_served, models)):
        if values := sorted(set(values)):
            where.append(column.in_(values))
    # One statement, so one snapshot: a row's dimension was committed before the row, so the join
    # finds it. The order puts each bucket's groups together, so a LIMIT cuts at most the last one.
    query = (select(c.bucket_start, *columns, _sum(c.input_tokens), _sum(c.output_tokens), _sum(c.requests),
                    _sum(c.errors))
             .select_from(table.join(usage_dims, d.id == c.dim_id)).where(*where)
             .group_by(c.bucket_start, *columns).order_by(c.bucket_start, *columns))
    async with db.reading() as conn:
        rows = (await conn.execute(query if max_entries is None else query.limit(max_entries + 1))).all()
        sizes: dict[int, int] = {}
        for row in rows:
            sizes[row[0]] = sizes.get(row[0], 0) + 1
        # Cut short by the LIMIT, the last bucket read counts what was read of it: the max_entries + 1 rows
        # up to it already pass the bound, so _fitting stops before it, unless it is the first bucket
        # (larger than the bound alone); that one is read again whole (a page holds at least one bucket).
        taken = _fitting([sizes.get(start, 0) for start in starts], max_entries)
        cut = max_entries is not None and len(rows) > max_entries
        if cut and taken == 1 and rows[-1][0] == starts[0]:
            rows = (await conn.execute(query.where(c.bucket_start == starts[0]))).all()
    page = set(starts[:taken])
    out: dict[int, dict[Group, list[int]]] = {}
    for start, *values in rows:
        if start not in page:
            continue
        named = dict(zip((name for name in GROUP_COLUMNS if name in groups), values))
        group: Group = tuple(named.get(name) for name in GROUP_COLUMNS)  # type: ignore[assignment]
        out.setdefault(start, {})[group] = [int(v or 0) for v in values[len(columns):]]
    return out, taken


def _fitting(sizes: list[int], max_entries: int | None) -> int:
    """How many of the first buckets fit in `max_entries` (each costs its size + 1); at least one."""
    if max_entries is None:
        return len(sizes)
    spent = 0
    for taken, size in enumerate(sizes):
        spent += size + 1
        if spent > max_entries and taken:
            return taken
    return len(sizes)


@dataclass
class UsageReport:
    """The shape of gateway.usage.report.Report, so its render() prints this one too."""

    rows: dict[tuple[str, str, str], dict] = field(default_factory=dict)
    conditional: dict[tuple[str, str], dict] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    records: int = 0


def _pieces(since: int, until: int) -> list[tuple[str, int, int]]:
    """[since, until) as (source, start, end): whole days from the day rollup, whole hours from the hour
    rollup, the rest from the ledger itself."""
    pieces: list[tuple[str, int, int]] = []
    first_hour = -(-since // HOUR_S) * HOUR_S
    last_hour = until // HOUR_S * HOUR_S
    if first_hour >= last_hour:
        return [("ledger", since, until)]
    first_day = -(-first_hour // DAY_S) * DAY_S
    last_day = last_hour // DAY_S * DAY_S
    if since < first_hour:
        pieces.append(("ledger", since, first_hour))
    if first_day < last_day:
        if first_hour < first_day:
            pieces.append(("1h", first_hour, first_day))
        pieces.append(("1d", first_day, last_day))
        if last_day < last_hour:
            pieces.append(("1h", last_day, last_hour))
    else:
        pieces.append(("1h", first_hour, last_hour))
    if last_hour < until:
        pieces.append(("ledger", last_hour, until))
    return pieces


def _rollup_sums(table: Table, start: int, end: int):  # type: ignore[no-untyped-def]
    c = table.c
    return (select(c.dim_id, _sum(c.requests), _sum(c.errors), _sum(c.input_tokens), _sum(c.output_tokens),
                   _sum(c.gateway_counted))
            .where(c.bucket_start >= start, c.bucket_start < end).group_by(c.dim_id))


def _ledger_sums(start: int, end: int):  # type: ignore[no-untyped-def]
    c, d = usage_ledger.c, usage_dims.c
    counted = case((and_(d.usage_source != "engine", c.input_tokens + c.output_tokens > 0), 1), else_=0)
    return (select(c.dim_id, func.count(), _sum(case((c.status >= 400, 1), else_=0)), _sum(c.input_tokens),
                   _sum(c.output_tokens), _sum(counted))
            .select_from(usage_ledger.join(usage_dims, d.id == c.dim_id))
            .where(c.time_ms >= start * 1000, c.time_ms < end * 1000).group_by(c.dim_id))


async def report(db: Database, since: datetime | None = None, until: datetime | None = None) -> UsageReport:
    """Usage by tenant x license x model (served) for [since, until), and the conditional licenses used by
    production tenants, as `gateway usage report` prints them. Exact to the second within the ledger's
    retention; beyond it, to the hour (the rollups outlive the rows)."""
    start = int(since.timestamp()) if since else 0
    end = int(until.timestamp()) if until else int(time.time()) + 1
    sums: dict[int, list[int]] = {}
    if end > start:
        async with db.reading() as conn:
            for source, a, b in _pieces(start, end):
                query = _ledger_sums(a, b) if source == "ledger" else _rollup_sums(ROLLUPS[source], a, b)
                for dim_id, *values in (await conn.execute(query)).all():
                    acc = sums.setdefault(dim_id, [0, 0, 0, 0, 0])
                    for i, value in enumerate(values):
                        acc[i] += int(value or 0)
            dims = {row.id: row for row in (await conn.execute(
                select(usage_dims).where(usage_dims.c.id.in_(sorted(sums))))).all()} if sums else {}
    out = UsageReport()
    for dim_id, (requests, errors, inp, outp, counted) in sorted(sums.items()):
        dim = dims[dim_id]
        key = (dim.tenant, dim.license, dim.model_served)
        row = out.rows.setdefault(key, {"tenant": key[0], "license": key[1], "model": key[2],
                                        "commercial_use": dim.commercial_use, "requests": 0, "errors": 0,
                                        "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                                        "gateway_counted": 0})
        row["requests"] += requests
        row["errors"] += errors
        row["prompt_tokens"] += inp
        row["completion_tokens"] += outp
        row["total_tokens"] += inp + outp
        row["gateway_counted"] += counted
        out.records += requests
        if dim.commercial_use == "conditional" and dim.environment == "production":
            entry = out.conditional.setdefault(key[:2], {"tenant": key[0], "license": key[1], "models": set(),
                                                         "attestations": set(), "requests": 0, "total_tokens": 0})
            entry["models"].add(key[2])
            entry["attestations"].update(orjson.loads(dim.attestations))
            entry["requests"] += requests
            entry["total_tokens"] += inp + outp
    return out


@dataclass(frozen=True)
class PeriodUsage:
    """Tokens (input + output) a tenant used in the current UTC day and month. `day` and `month` are
    numbered as gateway.admission.quota numbers them (unix day; year * 12 + month - 1)."""

    day: int
    month: int
    day_used: int
    month_used: int


def _periods(now: float) -> tuple[int, int, int]:
    """(day number, month number, unix seconds of the month's first day)."""
    moment = datetime.fromtimestamp(now, timezone.utc)
    month_start = int(datetime(moment.year, moment.month, 1, tzinfo=timezone.utc).timestamp())
    return int(now // DAY_S), moment.year * 12 + moment.month - 1, month_start


async def period_usage_all(db: Database, now: float | None = None,
                           tenants: Iterable[str] = ()) -> dict[str, PeriodUsage]:
    """Every tenant with use this month (or just `tenants`); from the day rollup."""
    now = time.time() if now is None else now
    day, month, month_start = _periods(now)
    table, d = ROLLUPS["1d"], usage_dims.c
    tokens = table.c.input_tokens + table.c.output_tokens
    today = day * DAY_S
    query = (select(d.tenant, _sum(case((table.c.bucket_start == today, tokens), else_=0)), _sum(tokens))
             .select_from(table.join(usage_dims, usage_dims.c.id == table.c.dim_id))
             .where(table.c.bucket_start >= month_start, table.c.bucket_start <= today).group_by(d.tenant))
    wanted = sorted(set(tenants))
    if wanted:
        query = query.where(d.tenant.in_(wanted))
    async with db.reading() as conn:
        rows = (await conn.execute(query)).all()
    return {tenant: PeriodUsage(day, month, int(day_used or 0), int(month_used or 0))
            for tenant, day_used, month_used in rows}


async def period_usage(db: Database, tenant: str, now: float | None = None) -> PeriodUsage:
    now = time.time() if now is None else now
    found = (await period_usage_all(db, now, [tenant])).get(tenant)
    if found is not None:
        return found
    day, month, _ = _periods(now)
    return PeriodUsage(day, month, 0, 0)


__all__ = ["GROUP_COLUMNS", "Group", "Key", "PeriodUsage", "UsageReport", "WIDTHS", "period_usage",
           "period_usage_all", "report", "usage_buckets", "usage_page"]
