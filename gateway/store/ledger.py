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
        async with self._db.writing() as conn:
            if self._db.is_sqlite:
                await _write_sqlite(conn, payload.decode(), dim_ids)
            else:
                by_gateway = [dim[9] != "engine" for dim in dims]  # usage_source: tokens the gateway counted
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


# SQLite: the batch's rows go from its JSON (json_each) straight into the ledger; a row whose request id
# is there already (a replay) is skipped by the primary key (ON CONFLICT DO NOTHING). The rows this transaction
# inserted are those past the ledger's largest rowid before it (SQLite gives a new row max(rowid) + 1, and
# BEGIN IMMEDIATE holds the database's one write lock throughout, so no other writer comes in between):
# only those are summed, once, per minute and dimension, and the three rollups are upserted from those
# few sums. (A temporary table of the batch's rows, filled, probed and emptied per batch, and a rollup
# scan of the batch per width, cost about a third more of the batch's CPU.)
_SQLITE_TEMP = (
    "CREATE TEMP TABLE IF NOT EXISTS ledger_batch_dims (dim_index INTEGER PRIMARY KEY, dim_id INTEGER)",
    "CREATE TEMP TABLE IF NOT EXISTS ledger_batch_minutes (bucket_start INTEGER, dim_id INTEGER, requests INTEGER, "
    "errors INTEGER, input_tokens INTEGER, output_tokens INTEGER, gateway_counted INTEGER)",
)  # empty at the start of every transaction: emptied at its end, and a rollback empties them too


def _sqlite_clamped(index: int, high: int) -> str:
    return f"max(min(CAST(round(json_extract(e.value, '$[{index}]')) AS INTEGER), {high}), 0)"


_SQLITE_INSERT = (
    "INSERT INTO usage_ledger (request_id, time_ms, dim_id, input_tokens, output_tokens, status, "
    "latency_ms) SELECT json_extract(e.value, '$[0]'), json_extract(e.value, '$[1]'), d.dim_id, "
    f"{_sqlite_clamped(3, _INT32)}, {_sqlite_clamped(4, _INT32)}, {_sqlite_clamped(5, 32767)}, "
    f"{_sqlite_clamped(6, _INT32)} FROM json_each(?, '$.rows') AS e "
    "JOIN temp.ledger_batch_dims d ON d.dim_index = json_extract(e.value, '$[2]') "
    "WHERE true ON CONFLICT (request_id) DO NOTHING")  # not OR IGNORE: a row with no id refuses its batch

_SQLITE_MINUTES = (
    "INSERT INTO temp.ledger_batch_minutes SELECT l.time_ms / 60000 * 60, l.dim_id, count(*), sum(l.status >= 400), "
    "sum(l.input_tokens), sum(l.output_tokens), "
    "sum(d.usage_source != 'engine' AND l.input_tokens + l.output_tokens > 0) "
    "FROM usage_ledger l JOIN usage_dims d ON d.id = l.dim_id WHERE l.rowid > ? GROUP BY 1, 2")


def _sqlite_rollup(name: str, size: int) -> str:
    sets = ", ".join(f"{c} = {name}.{c} + excluded.{c}" for c in _VALUES)
    sums = ", ".join(f"sum({c})" for c in _VALUES)
    return (f"INSERT INTO {name} (bucket_start, dim_id, {', '.join(_VALUES)}) "
            f"SELECT bucket_start / {size} * {size}, dim_id, {sums} FROM temp.ledger_batch_minutes "
            "WHERE true GROUP BY 1, 2 ORDER BY 1, 2 "  # WHERE: SQLite's parser needs it before ON CONFLICT
            f"ON CONFLICT (bucket_start, dim_id) DO UPDATE SET {sets}")


_SQLITE_ROLLUPS = tuple(_sqlite_rollup(f"usage_{w}", size) for w, size in WIDTHS.items())


async def _write_sqlite(conn: "AsyncConnection", payload: str, dim_ids: list[int]) -> None:
    last = (await conn.exec_driver_sql("SELECT coalesce(max(rowid), 0) FROM usage_ledger")).scalar()
    for step in _SQLITE_TEMP:
        await conn.exec_driver_sql(step)
    await conn.exec_driver_sql("INSERT INTO temp.ledger_batch_dims VALUES (?, ?)", list(enumerate(dim_ids)))
    await conn.exec_driver_sql(_SQLITE_INSERT, (payload,))
    await conn.exec_driver_sql(_SQLITE_MINUTES, (last,))
    for rollup in _SQLITE_ROLLUPS:
        await conn.exec_driver_sql(rollup)
    await conn.exec_driver_sql("DELETE FROM temp.ledger_batch_minutes")
    await conn.exec_driver_sql("DELETE FROM temp.ledger_batch_dims")
