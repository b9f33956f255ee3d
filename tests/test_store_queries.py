"""Reading the ledger: usage buckets, the report, the quota periods, and retention; each checked against
the same figures computed by brute force from the rows written, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import text

from gateway.store import queries, retention
from gateway.store.database import Database
from gateway.store.ledger import Ledger, LedgerRow
from gateway.store.schema import usage_ledger
from gateway.usage.report import render
from tests.support.store_fixtures import db_url, migrated, pg_cluster, row  # noqa: F401

DAY = 86400
BASE = int(datetime(2026, 11, 3, tzinfo=timezone.utc).timestamp())  # a Tuesday; November has 30 days


def _rows(count: int, seed: int = 7) -> list[LedgerRow]:
    """Rows spread over three days from BASE, across tenants, keys, models, sources and statuses."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        tenant = rng.choice(["acme", "globex", "initech"])
        model, license_, use = rng.choice([("llama-2-7b-chat", "llama2", "conditional"),
                                           ("falcon-7b", "apache-2.0", "yes"), ("vicuna-7b-v1.3", "llama", "no")])
        out.append(row(i, when=BASE + rng.uniform(0, 3 * DAY), tenant=tenant, key_id=rng.choice(["k1", "k2"]),
                       model=model, license_=license_, commercial_use=use,
                       environment="production" if tenant != "initech" else "research",
                       attestations=(f"{tenant}-attests",) if tenant == "acme" else (),
                       tokens=(rng.randint(0, 50), rng.randint(0, 20)), source=rng.choice(["engine", "gateway", "none"]),
                       status=rng.choice([200, 200, 200, 429, 502])))
    return out


async def _write(db: Database, tmp: Path, rows: list[LedgerRow]) -> None:
    ledger = Ledger(db, tmp / "spool", interval_s=3600)
    await ledger.start()
    for r in rows:
        ledger.record(r)
    await ledger.close()


def test_usage_buckets_match_the_rows_per_width_and_filter(db_url: str, tmp_path: Path) -> None:
    rows = _rows(1500)

    async def scenario() -> None:
        db = await migrated(db_url, tmp_path)
        try:
            await _write(db, tmp_path, rows)
            for width, size, count in (("1m", 60, 300), ("1h", 3600, 80), ("1d", DAY, 4)):
                starts = [BASE + 13 * size + i * size for i in range(count)] if width != "1d" else \
                    [BASE + i * DAY for i in range(count)]
                for filters in ({}, {"tenants": ["acme", "globex"]}, {"key_ids": ["k2"], "models": ["falcon-7b"]}):
                    got = await queries.usage_buckets(db, width, starts, **filters)
                    assert got == _expected(rows, size, starts, **filters), (width, filters)
                    assert got  # the windows hold rows: the comparison means something
        finally:
            await db.dispose()

    asyncio.run(scenario())


def _expected(rows: list[LedgerRow], size: int, starts: list[int], tenants=(), key_ids=(), models=()) -> dict:  # type: ignore[no-untyped-def]
    out: dict = {}
    for r in rows:
        start = int(r.time) // size * size
        if start not in starts or (tenants and r.tenant not in tenants) or (key_ids and r.key_id not in key_ids) \
                or (models and r.model_served not in models):
            continue
        acc = out.setdefault(start, {}).setdefault((r.tenant, r.key_id, r.model_served, r.license), [0, 0, 0])
        acc[0] += r.input_tokens
        acc[1] += r.output_tokens
        acc[2] += 1
    return out


def _brute_report(rows: list[LedgerRow], since: int, until: int) -> tuple[dict, dict]:
    table: dict = {}
    conditional: dict = {}
    for r in rows:
        if not since <= int(r.time) < until:
            continue
        key = (r.tenant, r.license, r.model_served)
        acc = table.setdefault(key, [0, 0, 0, 0, 0])
        acc[0] += 1
        acc[1] += r.status >= 400
        acc[2] += r.input_tokens
        acc[3] += r.output_tokens
        acc[4] += r.usage_source != "engine" and r.input_tokens + r.output_tokens > 0
        if r.commercial_use == "conditional" and r.environment == "production":
            entry = conditional.setdefault(key[:2], [set(), set(), 0, 0])
            entry[0].add(r.model_served)
            entry[1].update(r.attestations)
            entry[2] += 1
            entry[3] += r.input_tokens + r.output_tokens
    return table, conditional


def test_the_report_is_exact_to_the_second_for_any_period(db_url: str, tmp_path: Path) -> None:
    rows = _rows(1500, seed=11)
    rng = random.Random(3)
    periods = [(BASE, BASE + 3 * DAY), (BASE + 3600, BASE + DAY + 7200), (BASE + 1234, BASE + 1234 + 600),
               (BASE + DAY - 59, BASE + 2 * DAY + 61)]
    periods += [tuple(sorted(rng.sample(range(BASE - 3600, BASE + 3 * DAY + 3600), 2))) for _ in range(6)]

    async def scenario() -> None:
        db = await migrated(db_url, tmp_path)
        try:
            await _write(db, tmp_path, rows)
            for since, until in periods:
                got = await queries.report(db, datetime.fromtimestamp(since, timezone.utc),
                                           datetime.fromtimestamp(until, timezone.utc))
                table, conditional = _brute_report(rows, since, until)
                assert {k: [v["requests"], v["errors"], v["prompt_tokens"], v["completion_tokens"],
                            v["gateway_counted"]] for k, v in got.rows.items()} == table, (since, until)
                assert {k: [v["models"], v["attestations"], v["requests"], v["total_tokens"]]
                        for k, v in got.conditional.items()} == conditional
                assert got.records == sum(v[0] for v in table.values())
            whole = await queries.report(db)
            text_ = render(whole, "table")  # gateway usage report's own renderer takes it as it is
            assert "acme" in text_ and "acme-attests" in text_ and "initech" in text_
        finally:
            await db.dispose()

    asyncio.run(scenario())


def test_period_usage_is_today_and_this_month_per_tenant(db_url: str, tmp_path: Path) -> None:
    now = BASE + 10 * DAY + 5 * 3600  # 13 November, 05:00 UTC
    rows = [row(0, when=now - 3600, tenant="acme", tokens=(100, 20)),           # today
            row(1, when=now - 5 * 3600 - 1, tenant="acme", tokens=(7, 3)),      # yesterday, this month
            row(2, when=BASE - 3 * DAY, tenant="acme", tokens=(1000, 1000)),    # October
            row(3, when=now - 60, tenant="globex", tokens=(5, 5)),
            row(4, when=now + 3600, tenant="acme", tokens=(9, 9))]              # later today (clock skew)

    async def scenario() -> None:
        db = await migrated(db_url, tmp_path)
        try:
            await _write(db, tmp_path, rows)
            acme = await queries.period_usage(db, "acme", now=now)
            assert (acme.day_used, acme.month_used) == (120 + 18, 120 + 10 + 18)
            assert acme.day == now // DAY and acme.month == 2026 * 12 + 10
            every = await queries.period_usage_all(db, now=now)
            assert {t: (p.day_used, p.month_used) for t, p in every.items()} == {"acme": (138, 148), "globex": (10, 10)}
            assert (await queries.period_usage(db, "nobody", now=now)).month_used == 0
        finally:
            await db.dispose()

    asyncio.run(scenario())


def test_retention_deletes_in_bounded_batches_and_keeps_the_rollups(db_url: str, tmp_path: Path) -> None:
    now = BASE + 200 * DAY
    old = [row(i, when=now - 100 * DAY + i * 0.01) for i in range(12_000)]
    recent = [row(20_000 + i, when=now - DAY + i) for i in range(10)]

    async def scenario() -> None:
        db = await migrated(db_url, tmp_path)
        try:
            await _write(db, tmp_path, old + recent)
            batches: list[int] = []
            deleted = await retention.delete_before(db, usage_ledger, int((now - 90 * DAY) * 1000), batch=5000,
                                                    on_batch=batches.append)
            assert deleted == 12_000 and batches == [5000, 5000, 2000]
            done = await retention.purge(db, ledger_days=90, now=now, batch=5000)
            assert done["usage_ledger"] == 0 and done["usage_1m"] > 0  # minute rollups: two days only
            async with db.reading() as conn:
                left = (await conn.execute(text("SELECT count(*) FROM usage_ledger"))).scalar()
                daily = (await conn.execute(text("SELECT sum(requests) FROM usage_1d"))).scalar()
                minutes = (await conn.execute(text("SELECT sum(requests) FROM usage_1m"))).scalar()
            assert left == 10 and int(daily) == 12_010 and int(minutes) == 10
            # The daily rollups still answer for the deleted rows' day.
            report = await queries.report(db, datetime.fromtimestamp((now - 101 * DAY) // DAY * DAY, timezone.utc),
                                          datetime.fromtimestamp((now - 99 * DAY) // DAY * DAY, timezone.utc))
            assert report.records == 12_000
        finally:
            await db.dispose()

    asyncio.run(scenario())
