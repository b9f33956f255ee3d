"""The usage ledger at scale, on PostgreSQL: 10 million ledger rows over 400 days (and their hour and day
rollups), their size on disk per row, and a 400-day usage report grouped by model through the store's
own query functions (the target: under a second). Also the writer's cost: CPU per recorded row.

    python load_tests/bench_ledger.py                         # its own throwaway cluster (initdb/pg_ctl)
    python load_tests/bench_ledger.py --database-url postgresql://user@host:5432/db --rows 1000000

Rows are generated in SQL (generate_series), not through the writer: 10 M rows through Python would
measure Python. The rollups are built from them with the same grouping the writer uses. Minute rollups
are made for the last 2 days only, their retention.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import text  # noqa: E402

from gateway.store import migrate, queries  # noqa: E402
from gateway.store.database import Database  # noqa: E402
from gateway.store.ledger import Ledger, LedgerRow  # noqa: E402

DAY = 86400
TENANTS, KEYS, MODELS = 20, 3, 10  # 600 dimensions: a large deployment's tenants x keys x models
CHUNK = 1_000_000


def _say(message: str) -> None:
    print(message, flush=True)


async def _generate(db: Database, rows: int, days: int, now: int) -> None:
    start_ms, step_ms = (now - days * DAY) * 1000, days * DAY * 1000 // rows
    dims = TENANTS * KEYS * MODELS
    async with db.writing() as conn:
        await conn.execute(text(
            "INSERT INTO usage_dims (tenant, key_id, model_requested, model_served, license, commercial_use, "
            "environment, attestations, endpoint, usage_source) "
            "SELECT 'tenant-' || t, lpad(to_hex(t * 16 + k), 8, '0'), 'model-' || m, 'model-' || m, "
            "CASE WHEN m < 3 THEN 'llama2' ELSE 'apache-2.0' END, CASE WHEN m < 3 THEN 'conditional' ELSE 'yes' END, "
            "CASE WHEN t % 2 = 0 THEN 'production' ELSE 'research' END, '[\"llama2-under-700m-mau\"]', 'chat', "
            "'engine' FROM generate_series(0, CAST(:t AS int) - 1) t, generate_series(0, CAST(:k AS int) - 1) k, "
            "generate_series(0, CAST(:m AS int) - 1) m"),
            {"t": TENANTS, "k": KEYS, "m": MODELS})
    for first in range(1, rows + 1, CHUNK):
        last = min(rows, first + CHUNK - 1)
        began = time.perf_counter()
        async with db.writing() as conn:
            await conn.execute(text(
                "INSERT INTO usage_ledger (time_ms, dim_id, input_tokens, output_tokens, latency_ms, status, "
                "request_id) SELECT CAST(:start AS int8) + g * CAST(:step AS int8), "
                "1 + (g * 7919) % CAST(:dims AS int8), 20 + g % 500, 5 + g % 300, "
                "50 + g % 2000, CASE WHEN g % 20 = 0 THEN 429 ELSE 200 END, lpad(to_hex(g), 32, '0')::uuid "
                "FROM generate_series(CAST(:first AS int8), CAST(:last AS int8)) g"),
                {"start": start_ms, "step": step_ms, "dims": dims, "first": first, "last": last})
        _say(f"  ledger rows {last:,} ({time.perf_counter() - began:.1f} s)")
    for name, size, since in (("usage_1d", DAY, 0), ("usage_1h", 3600, 0), ("usage_1m", 60, (now - 2 * DAY) * 1000)):
        began = time.perf_counter()
        async with db.writing() as conn:
            await conn.execute(text(
                f"INSERT INTO {name} SELECT time_ms / {size * 1000} * {size}, dim_id, count(*), "
                "count(*) FILTER (WHERE status >= 400), sum(input_tokens), sum(output_tokens), 0 "
                f"FROM usage_ledger WHERE time_ms >= {since} GROUP BY 1, 2"))
        _say(f"  {name} built ({time.perf_counter() - began:.1f} s)")
    async with db.engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("VACUUM ANALYZE"))


async def _sizes(db: Database, rows: int) -> None:
    async with db.reading() as conn:
        found = (await conn.execute(text(
            "SELECT pg_relation_size('usage_ledger'), pg_relation_size('usage_ledger_pkey'), "
            "pg_relation_size('ix_usage_ledger_time'), pg_total_relation_size('usage_ledger'), "
            "(SELECT count(*) FROM usage_1d), (SELECT count(*) FROM usage_1h), "
            "pg_total_relation_size('usage_1d') + pg_total_relation_size('usage_1h')"))).one()
    heap, pk, brin, total, days, hours, rollups = found
    _say(f"size: ledger {total / 2**20:,.0f} MiB for {rows:,} rows = {total / rows:.0f} bytes/row "
         f"(heap {heap / rows:.0f}, primary key {pk / rows:.0f}, BRIN time index {brin:,} bytes in all); "
         f"rollups {days:,} day + {hours:,} hour rows, {rollups / 2**20:,.0f} MiB")


async def _queries(db: Database, days: int, now: int, repeats: int) -> None:
    since = datetime.fromtimestamp(now - days * DAY, timezone.utc)
    until = datetime.fromtimestamp(now, timezone.utc)
    took = []
    for _ in range(repeats):
        began = time.perf_counter()
        report = await queries.report(db, since, until)
        by_model: dict[str, int] = defaultdict(int)
        for (_, _, model), row in report.rows.items():
            by_model[model] += row["total_tokens"]
        took.append(time.perf_counter() - began)
    _say(f"query: {days}-day usage report (tenant x license x model), grouped by model: median "
         f"{statistics.median(took) * 1000:.0f} ms, worst {max(took) * 1000:.0f} ms over {repeats} runs; "
         f"{report.records:,} requests, {len(by_model)} models")
    # The usage API's widest pages: 31 day buckets, 168 hour buckets (its maxima per request).
    for width, size, count in (("1d", DAY, 31), ("1h", 3600, 168)):
        starts = [now - count * size + i * size for i in range(count)]
        took = []
        for _ in range(repeats):
            began = time.perf_counter()
            buckets = await queries.usage_buckets(db, width, starts)
            took.append(time.perf_counter() - began)
        cells = sum(len(rows) for rows in buckets.values())
        _say(f"query: usage_buckets {width} x {count} (the usage API's largest page): median "
             f"{statistics.median(took) * 1000:.0f} ms, worst {max(took) * 1000:.0f} ms, {cells:,} cells")


async def _writer_cost(db: Database, spool: Path, rows: int = 100_000, batch: int = 2000) -> None:
    ledger = Ledger(db, spool, interval_s=3600)
    await ledger.start()
    now = time.time()
    cpu, wall = time.process_time(), time.perf_counter()
    for first in range(0, rows, batch):
        for i in range(first, first + batch):
            ledger.record(LedgerRow(f"bench-{i}", now, "tenant-0", "00000000", "model-0", "model-0", "llama2",
                                    "conditional", "production", ("llama2-under-700m-mau",), "chat", 30, 12,
                                    "engine", 200, 41.5))
        await ledger.flush(60)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await ledger.close()
    _say(f"writer: {rows:,} rows recorded and written in batches of {batch:,}: {cpu / rows * 1e6:.1f} us CPU "
         f"per row in this process (record, encode, spool, write), {rows / wall:,.0f} rows/s")


async def main_async(args: argparse.Namespace, url: str, spool: Path) -> None:
    db = Database.from_settings(url, spool, command_timeout_s=3600)  # building 10 M rows' rollups takes a while
    try:
        await migrate.upgrade(db)
        now = int(time.time()) // DAY * DAY
        began = time.perf_counter()
        _say(f"generating {args.rows:,} ledger rows over {args.days} days ...")
        await _generate(db, args.rows, args.days, now)
        _say(f"generated in {time.perf_counter() - began:.0f} s")
        await _sizes(db, args.rows)
        await _queries(db, args.days, now, args.repeats)
        await _writer_cost(db, spool / "spool")
    finally:
        await db.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--database-url", help="an empty PostgreSQL database; default: a throwaway cluster")
    args = parser.parse_args(argv)
    import tempfile

    spool = Path(tempfile.mkdtemp(prefix="bench-ledger-"))
    if args.database_url:
        asyncio.run(main_async(args, args.database_url, spool))
        return 0
    from tests.support.postgres import PostgresCluster

    cluster = PostgresCluster()
    try:
        asyncio.run(main_async(args, cluster.create_database("bench"), spool))
    finally:
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
