"""Retention: old rows deleted in bounded batches, never in one statement.

A DELETE of a whole month would hold its locks and write its WAL in one go (and on PostgreSQL leave as
many dead tuples for one vacuum to find); `batch` rows per transaction, found by the time index,
with a pause between, keeps every statement small. Ledger rows and policy decisions: the configured
days; minute rollups 2 days; hour and day rollups 400 days; stored responses: their own expiry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from sqlalchemy import Table, delete, select, tuple_

from gateway.store.database import Database
from gateway.store.schema import policy_decisions, usage_1d, usage_1h, usage_1m, usage_ledger

BATCH = 5000
ROLLUP_RETENTION_S = {"1m": 2 * 86400, "1h": 400 * 86400, "1d": 400 * 86400}
PAUSE_S = 0.05


async def delete_before(db: Database, table: Table, cutoff: int, *, batch: int = BATCH,
                        on_batch: Callable[[int], None] | None = None) -> int:
    """Delete the rows of `table` older than `cutoff` (its time column's unit), `batch` per transaction;
    returns how many."""
    when = table.c.time_ms if "time_ms" in table.c else table.c.bucket_start
    keys = list(table.primary_key.columns)
    key = keys[0] if len(keys) == 1 else tuple_(*keys)
    total = 0
    while True:
        async with db.writing() as conn:
            # No ORDER BY: any `batch` expired rows will do, and PostgreSQL's BRIN index can find some
            # without sorting all of them.
            oldest = select(*keys).where(when < cutoff).limit(batch)
            done = await conn.execute(delete(table).where(key.in_(oldest)))
            count = done.rowcount or 0
        total += count
        if on_batch is not None:
            on_batch(count)
        if count < batch:
            return total
        await asyncio.sleep(PAUSE_S)  # let other writers (the ledger's flush) in between


async def purge(db: Database, ledger_days: int, now: float | None = None, *, batch: int = BATCH) -> dict[str, int]:
    """One retention pass over every table; returns rows deleted per table."""
    now = time.time() if now is None else now
    ledger_cutoff_ms = int((now - ledger_days * 86400) * 1000)
    done = {
        "usage_ledger": await delete_before(db, usage_ledger, ledger_cutoff_ms, batch=batch),
        "policy_decisions": await delete_before(db, policy_decisions, ledger_cutoff_ms, batch=batch),
    }
    for width, table in (("1m", usage_1m), ("1h", usage_1h), ("1d", usage_1d)):
        done[table.name] = await delete_before(db, table, int(now - ROLLUP_RETENTION_S[width]), batch=batch)
    return done
