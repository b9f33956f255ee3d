"""The usage ledger: one row per finished request (no prompts, no answers), and its rollups.

`Ledger.record(row)` appends to memory (the request path); the shared `BatchWriter` makes each second's
rows durable (spool, then database). One database transaction per batch inserts the rows whose request
id is not there yet (the request id is the primary key: ON CONFLICT DO NOTHING) and adds only those to
the minute, hour and day rollups, so a request recorded twice (a batch replayed after a lost commit
acknowledgement, or two replicas replaying one spool) counts once. Request ids are the gateway's own
(gateway/api/request_context.py: 32 hex digits, stored as a 16-byte UUID); no client chooses them.
Rollup rows are upserted in key order, so replicas flushing at once queue on row locks, never deadlock.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.store.batches import BatchWriter, Encoded
from gateway.store.database import Database
from gateway.store.dims import Dimensions
from gateway.store.schema import USAGE_DIM_COLUMNS, usage_dims

WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
ENDPOINTS = ("chat", "completions", "responses")
_INT32 = 2**31 - 1
_VALUES = ("requests", "errors", "input_tokens", "output_tokens", "gateway_counted")
_HEX32 = re.compile(r"[0-9a-f]{32}")


def request_key(request_id: str) -> str:
    """The ledger's key for a request id: the id itself when it is the gateway's (32 hex digits), else
    (ids made elsewhere, e.g. by a test or an import) the MD5 of it, so the same id is the same key."""
    if _HEX32.fullmatch(request_id):
        return request_id
    return hashlib.md5(request_id.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(slots=True)
class LedgerRow:
    """What the usage record of one finished request holds. The caller may cache the configuration-only
    fields per (tenant, key, model); `attestations` is a sorted tuple."""

    request_id: str  # the gateway's (32 hex digits): each request is counted once
    time: float  # unix seconds, when the request finished
    tenant: str
    key_id: str
    model_requested: str
    model_served: str
    license: str
    commercial_use: str  # the license's: yes | no | conditional | unknown
    environment: str
    attestations: tuple[str, ...]
    endpoint: str  # chat | completions | responses
    input_tokens: int
    output_tokens: int
    usage_source: str  # engine | gateway | gateway_estimate | none
    status: int
    latency_ms: float


class Ledger:
    def __init__(self, db: Database, spool_dir: Path, *, interval_s: float = 1.0,
                 on_outage: Callable[[bool], None] | None = None, max_spool_bytes: int = 1 << 30,
                 log_outages: bool = True) -> None:
        self._db = db
        self._dims = Dimensions(db, usage_dims, USAGE_DIM_COLUMNS)
        self._attestations: dict[tuple[str, ...], str] = {}
        self.writer: BatchWriter[LedgerRow] = BatchWriter(
            "usage ledger", spool_dir, self._encode, self._write, interval_s=interval_s,
            on_outage=on_outage, max_spool_bytes=max_spool_bytes, log_outages=log_outages)
        self.record = self.writer.record  # the request path: one list append

    async def start(self) -> None:
        await self.writer.start()

    async def flush(self, timeout: float = 5.0) -> bool:
        return await self.writer.flush(timeout)

    async def close(self, timeout: float = 5.0) -> None:
        await self.writer.close(timeout)

    @property
    def healthy(self) -> bool:
        return self.writer.healthy

    def _encode(self, rows: list[LedgerRow]) -> Encoded:
        """Off the request path (at the tick): the batch as JSON-ready lists, each row with its request key
        and the index of its dimensions in the batch's "dims" (strings, so a spooled batch means the same in
        any database). Range checks are the database's (see the SQL): nothing per row here but this."""
        dims: dict[tuple, int] = {}
        out = []
        hex32 = _HEX32.fullmatch
        for r in rows:
            key = (r.tenant, r.key_id, r.model_requested, r.model_served, r.license, r.commercial_use,
                   r.environment, r.attestations, r.endpoint, r.usage_source)
            index = dims.get(key)
            if index is None:
                index = dims[key] = len(dims)
            rid = r.request_id
            out.append([rid if hex32(rid) else request_key(rid), int(r.time * 1000), index, r.input_tokens,
                        r.output_tokens, r.status, round(r.latency_ms)])
        return {"dims": [[*key[:7], self._attestations_text(key[7]), *key[8:]] for key in dims], "rows": out}

    def _attestations_text(self, attestations: tuple[str, ...]) -> str:
        found = self._attestations.get(attestations)
        if found is None:
            found = self._attestations[attestations] = orjson.dumps(sorted(attestations)).decode()
        return found

    async def _write(self, batch: Encoded, payload: bytes) -> None:
        dims = [tuple(dim) for dim in batch["dims"]]
        known = await self._dims.ids(dims)
        dim_ids = [known[dim] for dim in dims]
        by_gateway = [dim[9] != "engine" for dim in dims]  # usage_source: tokens the gateway counted
        async with self._db.writing() as conn:
            if self._db.is_sqlite:
                await _write_sqlite(conn, payload.decode(), dim_ids, by_gateway)
            else:
                raw = (await conn.get_raw_connection()).driver_connection
                await raw.fetchval(_PG_WRITE, payload.decode(), dim_ids, by_gateway)


# PostgreSQL: one statement per batch, its rows parsed from the batch's JSON by the server (per-row
# parameters cost the gateway ~10-40 us a row in Python; this is a few us per batch). The insert returns
# the ids it actually inserted, and only those rows, grouped in key order, are added to the three rollups.
# Out-of-range numbers are clamped here, so no row can make its whole batch fail.
def _clamped(index: int, high: int, pg_type: str) -> str:
    return f"least(greatest(round((e->>{index})::float8)::int8, 0), {high})::{pg_type}"


def _pg_rollup(name: str, size: int) -> str:
    sets = ", ".join(f"{c} = {name}.{c} + excluded.{c}" for c in _VALUES)
    return (f"{name}_up AS (INSERT INTO {name} (bucket_start, dim_id, {', '.join(_VALUES)}) "
            f"SELECT time_ms / {size * 1000} * {size}, dim_id, count(*), count(*) FILTER (WHERE status >= 400), "
            "sum(input_tokens), sum(output_tokens), count(*) FILTER (WHERE counted) "
            f"FROM fresh GROUP BY 1, 2 ORDER BY 1, 2 "
            f"ON CONFLICT (bucket_start, dim_id) DO UPDATE SET {sets})")


# DISTINCT ON: a batch holding one request twice (two spool files replayed into one queue) inserts it once.
_PG_WRITE = (
    "WITH batch AS (SELECT DISTINCT ON (request_id) * FROM (SELECT (e->>0)::uuid AS request_id, "
    "(e->>1)::int8 AS time_ms, "
    "($2::int4[])[(e->>2)::int4 + 1] AS dim_id, ($3::bool[])[(e->>2)::int4 + 1] AS by_gateway, "
    f"{_clamped(3, _INT32, 'int4')} AS input_tokens, {_clamped(4, _INT32, 'int4')} AS output_tokens, "
    f"{_clamped(5, 32767, 'int2')} AS status, {_clamped(6, _INT32, 'int4')} AS latency_ms "
    "FROM json_array_elements($1::json -> 'rows') AS e) AS parsed ORDER BY request_id), "
    "inserted AS (INSERT INTO usage_ledger (request_id, time_ms, dim_id, input_tokens, output_tokens, status, "
    "latency_ms) SELECT request_id, time_ms, dim_id, input_tokens, output_tokens, status, latency_ms "
    "FROM batch ORDER BY request_id ON CONFLICT (request_id) DO NOTHING RETURNING request_id), "
    "fresh AS (SELECT batch.*, by_gateway AND input_tokens + output_tokens > 0 AS counted "
    "FROM batch JOIN inserted USING (request_id)), "
    + ", ".join(_pg_rollup(f"usage_{w}", size) for w, size in WIDTHS.items())
    + " SELECT count(*) FROM inserted")


# SQLite: the batch's rows go into a temporary table straight from its JSON (json_each), the rows already
# in the ledger are taken out of it (a replay), and the rest is inserted and rolled up in SQL. BEGIN
# IMMEDIATE holds the database's one write lock throughout, so no other writer can come in between.
_SQLITE_TEMP = (
    "CREATE TEMP TABLE IF NOT EXISTS ledger_batch (request_id TEXT PRIMARY KEY, time_ms INTEGER, "
    "dim_index INTEGER, input_tokens INTEGER, output_tokens INTEGER, status INTEGER, latency_ms INTEGER)",
    "CREATE TEMP TABLE IF NOT EXISTS ledger_batch_dims (dim_index INTEGER PRIMARY KEY, dim_id INTEGER, "
    "by_gateway INTEGER)",
)  # empty at the start of every transaction: emptied at its end, and a rollback empties them too


def _sqlite_clamped(index: int, high: int) -> str:
    return f"max(min(CAST(round(json_extract(value, '$[{index}]')) AS INTEGER), {high}), 0)"


_SQLITE_LOAD = (
    "INSERT OR IGNORE INTO temp.ledger_batch SELECT json_extract(value, '$[0]'), "
    "json_extract(value, '$[1]'), json_extract(value, '$[2]'), "
    f"{_sqlite_clamped(3, _INT32)}, {_sqlite_clamped(4, _INT32)}, {_sqlite_clamped(5, 32767)}, "
    f"{_sqlite_clamped(6, _INT32)} FROM json_each(?, '$.rows')")


def _sqlite_rollup(name: str, size: int) -> str:
    sets = ", ".join(f"{c} = {name}.{c} + excluded.{c}" for c in _VALUES)
    return (f"INSERT INTO {name} (bucket_start, dim_id, {', '.join(_VALUES)}) "
            f"SELECT b.time_ms / {size * 1000} * {size}, d.dim_id, count(*), sum(b.status >= 400), "
            "sum(b.input_tokens), sum(b.output_tokens), sum(d.by_gateway AND b.input_tokens + b.output_tokens > 0) "
            "FROM temp.ledger_batch b JOIN temp.ledger_batch_dims d USING (dim_index) "
            "WHERE true GROUP BY 1, 2 ORDER BY 1, 2 "  # WHERE: SQLite's parser needs it before ON CONFLICT
            f"ON CONFLICT (bucket_start, dim_id) DO UPDATE SET {sets}")


_SQLITE_STEPS = (
    # EXISTS, not `request_id IN (SELECT request_id FROM usage_ledger)`: SQLite plans that one as a walk
    # over every request id in the ledger, probing the batch for each (a batch cost that grew with the
    # ledger: 10 ms per 2,000 rows at 60,000 rows); this one probes the ledger's key once per batch row.
    "DELETE FROM temp.ledger_batch WHERE EXISTS (SELECT 1 FROM usage_ledger l "
    "WHERE l.request_id = temp.ledger_batch.request_id)",
    "INSERT INTO usage_ledger (request_id, time_ms, dim_id, input_tokens, output_tokens, status, latency_ms) "
    "SELECT b.request_id, b.time_ms, d.dim_id, b.input_tokens, b.output_tokens, b.status, b.latency_ms "
    "FROM temp.ledger_batch b JOIN temp.ledger_batch_dims d USING (dim_index)",
    *(_sqlite_rollup(f"usage_{w}", size) for w, size in WIDTHS.items()),
    "DELETE FROM temp.ledger_batch",
    "DELETE FROM temp.ledger_batch_dims",
)


async def _write_sqlite(conn: "AsyncConnection", payload: str, dim_ids: list[int], by_gateway: list[bool]) -> None:
    for step in _SQLITE_TEMP:
        await conn.exec_driver_sql(step)
    await conn.exec_driver_sql("INSERT INTO temp.ledger_batch_dims VALUES (?, ?, ?)",
                               [(i, dim_id, gw) for i, (dim_id, gw) in enumerate(zip(dim_ids, by_gateway))])
    await conn.exec_driver_sql(_SQLITE_LOAD, (payload,))
    for step in _SQLITE_STEPS:
        await conn.exec_driver_sql(step)
