"""Policy decisions (allow, deny, substitute, not_found): the audit trail's decision records, also in the
database, written in batches like the ledger (the same `BatchWriter`), searchable by request id, tenant,
model, decision and time range, newest first, one capped page at a time. One decision per request, keyed
(and deduplicated, as the ledger is) by the gateway's request id.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
from sqlalchemy import and_, or_, select, tuple_

from gateway.errors import GatewayError
from gateway.store.batches import BatchWriter, Encoded
from gateway.store.database import Database
from gateway.store.dims import Dimensions
from gateway.store.ledger import request_key
from gateway.store.schema import DECISION_DIM_COLUMNS, decision_dims, policy_decisions

MAX_PAGE = 100
MAX_RANGE_S = 31 * 86400
DEFAULT_RANGE_S = 86400


@dataclass(slots=True)
class DecisionRow:
    """The fields of gateway.observability.audit.AuditRecord, and when it was decided."""

    request_id: str
    time: float  # unix seconds
    tenant: str
    key_id: str
    model_requested: str
    model_served: str | None
    license: str
    decision: str  # allow | deny | substitute | not_found
    rule: str


@dataclass(frozen=True)
class DecisionPage:
    data: list[dict]
    next_cursor: str | None  # pass as `cursor` for the next (older) page; None: this was the last


def _bad(message: str, param: str) -> GatewayError:
    return GatewayError(400, message, param=param, code="invalid_value")


class Decisions:
    def __init__(self, db: Database, spool_dir: Path, *, interval_s: float = 1.0,
                 on_outage: Callable[[bool], None] | None = None, max_spool_bytes: int = 1 << 30,
                 log_outages: bool = True) -> None:
        self._db = db
        self._dims = Dimensions(db, decision_dims, DECISION_DIM_COLUMNS)
        self.writer: BatchWriter[DecisionRow] = BatchWriter(
            "policy decisions", spool_dir, self._encode, self._write, interval_s=interval_s,
            on_outage=on_outage, max_spool_bytes=max_spool_bytes, log_outages=log_outages)
        self.record = self.writer.record

    async def start(self) -> None:
        await self.writer.start()

    async def flush(self, timeout: float = 5.0) -> bool:
        return await self.writer.flush(timeout)

    async def close(self, timeout: float = 5.0) -> None:
        await self.writer.close(timeout)

    def _encode(self, rows: list[DecisionRow]) -> Encoded:
        """As the ledger's: rows [request key, time_ms, dim index], their strings once in "dims"."""
        dims: dict[tuple, int] = {}
        out = []
        for r in rows:
            key = (r.tenant, r.key_id, r.model_requested, r.model_served or "", r.license, r.decision, r.rule)
            index = dims.get(key)
            if index is None:
                index = dims[key] = len(dims)
            out.append([request_key(r.request_id), int(r.time * 1000), index])
        return {"dims": [list(key) for key in dims], "rows": out}

    async def _write(self, batch: Encoded, payload: bytes) -> None:
        dims = [tuple(dim) for dim in batch["dims"]]
        known = await self._dims.ids(dims)
        dim_ids = [known[dim] for dim in dims]
        async with self._db.writing() as conn:
            if self._db.is_sqlite:
                await conn.exec_driver_sql(
                    "INSERT INTO policy_decisions (request_id, time_ms, dim_id) SELECT value ->> 0, value ->> 1, "
                    "json_extract(?, '$[' || (value ->> 2) || ']') FROM json_each(?, '$.rows') "
                    "WHERE true ON CONFLICT (request_id) DO NOTHING", (orjson.dumps(dim_ids).decode(), payload.decode()))
            else:
                raw = (await conn.get_raw_connection()).driver_connection
                await raw.execute(
                    "INSERT INTO policy_decisions (request_id, time_ms, dim_id) SELECT DISTINCT ON (1) (e->>0)::uuid, "
                    "(e->>1)::int8, ($2::int4[])[(e->>2)::int4 + 1] "
                    "FROM json_array_elements($1::json -> 'rows') AS e ORDER BY 1 ON CONFLICT (request_id) DO NOTHING",
                    payload.decode(), dim_ids)

    async def search(self, *, request_id: str | None = None, tenant: str | None = None, model: str | None = None,
                     decision: str | None = None, since: float | None = None, until: float | None = None,
                     limit: int = 50, cursor: str | None = None) -> DecisionPage:
        """Newest first. Without `request_id` the range is capped at 31 days (default: the last day);
        `model` matches the requested or the served model. Bad arguments raise GatewayError(400)."""
        if not 1 <= limit <= MAX_PAGE:
            raise _bad(f"`limit` must be between 1 and {MAX_PAGE}, not {limit}.", "limit")
        d, p = decision_dims.c, policy_decisions.c
        where = []
        if request_id is None:
            end = until if until is not None else time.time()
            start = since if since is not None else end - DEFAULT_RANGE_S
            if end <= start:
                raise _bad("`until` must be after `since`.", "until")
            if end - start > MAX_RANGE_S:
                raise _bad(f"A search without a request id spans at most 31 days, not {(end - start) / 86400:.1f}.",
                           "since")
            where += [p.time_ms >= int(start * 1000), p.time_ms < int(end * 1000)]
        else:
            where.append(p.request_id == request_key(request_id))
            if since is not None:
                where.append(p.time_ms >= int(since * 1000))
            if until is not None:
                where.append(p.time_ms < int(until * 1000))
        if tenant is not None:
            where.append(d.tenant == tenant)
        if model is not None:
            where.append(or_(d.model_requested == model, d.model_served == model))
        if decision is not None:
            where.append(d.decision == decision)
        if cursor is not None:
            where.append(tuple_(p.time_ms, p.request_id) < _cursor(cursor))
        query = (select(p.request_id, p.time_ms, *[d[c] for c in DECISION_DIM_COLUMNS])
                 .select_from(policy_decisions.join(decision_dims, d.id == p.dim_id))
                 .where(and_(*where)).order_by(p.time_ms.desc(), p.request_id.desc()).limit(limit + 1))
        async with self._db.reading() as conn:
            rows = (await conn.execute(query)).all()
        page = rows[:limit]
        data = [{"request_id": str(row[0]).replace("-", ""), "time": row[1] / 1000,
                 **dict(zip(DECISION_DIM_COLUMNS, row[2:]))} for row in page]
        for item in data:
            item["model_served"] = item["model_served"] or None
        more = len(rows) > limit
        last = page[-1] if page else None
        token = base64.urlsafe_b64encode(f"{last[1]}:{str(last[0]).replace('-', '')}".encode()).decode() \
            if more and last is not None else None
        return DecisionPage(data, token)


def _cursor(token: str) -> tuple[int, str]:
    try:
        time_ms, row_id = base64.urlsafe_b64decode(token.encode()).decode().split(":", 1)
        if len(row_id) != 32 or any(c not in "0123456789abcdef" for c in row_id):
            raise ValueError(row_id)
        return int(time_ms), row_id
    except (ValueError, UnicodeDecodeError):
        raise _bad("`cursor` must be the `next_cursor` of an earlier page.", "cursor") from None
