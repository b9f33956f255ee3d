"""Stored responses for the Responses API (`previous_response_id`, GET/DELETE /v1/responses/{id}).

`save` commits before it returns, so a follow-up sent the moment a response completed, to any replica,
finds it (LiteLLM batches these writes, and its follow-ups fail for ~10 s: BerriAI/litellm#28587).
Saves that arrive while a commit is in flight share the next one (group commit): each still returns
only once its row is durable, but 64 concurrent responses cost one commit (one fsync on SQLite), not 64
in a row (one transaction each held the embedded database to ~100 saves a second here). A small group
waits up to 2 ms for saves that other requests in flight announced (`expect`), never for nothing.
A response belongs to its tenant: another tenant's id answers None, as a missing one does, so nothing
tells that it exists. Expired or deleted responses lose their content (response NULL, input items
deleted); the row stays as a tombstone so the id is never reused. When the database is down `save`,
`get` and `delete` raise `StoreUnavailable` (the caller answers 503); nothing is spooled: a
conversation state the client cannot use right away is no use later.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import orjson
from sqlalchemy import and_, delete, select, update
from sqlalchemy import exc as sa_exc

from gateway.store.database import Database
from gateway.store.schema import response_input_items, responses


class StoreUnavailable(Exception):
    """The database could not be reached (or timed out)."""


@dataclass(frozen=True)
class StoredResponse:
    id: str  # "resp_..."
    tenant: str
    created_at: int  # unix seconds
    previous_response_id: str | None
    response: dict  # the full OpenAI response object, as returned to the client
    input_items: list[dict]  # this turn's input items, each with an "id" (OpenAI input_items shape)
    # `response` as the JSON the client was sent, when the caller has it: stored as is, not encoded again.
    encoded: bytes | None = None

    def response_json(self) -> str:
        return (self.encoded or orjson.dumps(self.response)).decode()


class ResponseStore(Protocol):
    def expect(self) -> object | None: ...
    async def save(self, item: StoredResponse, expires_at: int, expected: object | None = None) -> None: ...
    async def get(self, tenant: str, response_id: str) -> StoredResponse | None: ...
    async def delete(self, tenant: str, response_id: str) -> bool: ...
    async def purge_expired(self, now: int, batch: int = 5000) -> int: ...


def _unavailable(error: Exception) -> StoreUnavailable:
    return StoreUnavailable(f"response store unavailable: {str(getattr(error, 'orig', None) or error)[:200]}")


# sqlite3.OperationalError: the embedded file's writer (Database.write_sqlite) could not write or lock it.
_DOWN = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, sqlite3.OperationalError, OSError,
         TimeoutError)


_COLUMNS = "responses (id, tenant, created_at, expires_at, previous_response_id, response)"
_ITEM_COLUMNS = "response_input_items (response_id, position, item)"
_PG_INSERT_RESPONSES = f"INSERT INTO {_COLUMNS} VALUES ($1, $2, $3, $4, $5, $6)"  # asyncpg's parameter style
_PG_INSERT_ITEMS = f"INSERT INTO {_ITEM_COLUMNS} VALUES ($1, $2, $3)"


def _taken(response_id: str) -> ValueError:
    return ValueError(f"response id {response_id} is taken")


def _items(response_id: str, item: StoredResponse) -> list[tuple]:
    return [(response_id, i, orjson.dumps(entry).decode()) for i, entry in enumerate(item.input_items)]


def _write_sqlite(latest: dict[str, tuple[StoredResponse, int]], db: sqlite3.Connection) -> dict[str, Exception]:
    """The group's transaction on SQLite, as `_write` does it on PostgreSQL (run by Database.write_sqlite
    in its writer thread: one thread hop for the whole group)."""
    ids = list(latest)
    found = {row[0]: row for row in db.execute(
        f"SELECT id, tenant, deleted_at FROM responses WHERE id IN ({', '.join('?' * len(ids))})", ids)}
    refused: dict[str, Exception] = {}
    inserts: list[tuple] = []
    items: list[tuple] = []
    for response_id, (item, expires_at) in latest.items():
        body = item.response_json()
        existing = found.get(response_id)
        if existing is None:
            inserts.append((response_id, item.tenant, item.created_at, expires_at, item.previous_response_id, body))
        elif existing[1] != item.tenant or existing[2] is not None:
            refused[response_id] = _taken(response_id)
            continue
        else:
            db.execute("UPDATE responses SET tenant = ?, created_at = ?, expires_at = ?, previous_response_id = ?, "
                       "response = ?, deleted_at = NULL WHERE id = ?",
                       (item.tenant, item.created_at, expires_at, item.previous_response_id, body, response_id))
            db.execute("DELETE FROM response_input_items WHERE response_id = ?", (response_id,))
        items.extend(_items(response_id, item))
    if inserts:
        db.executemany(f"INSERT INTO {_COLUMNS} VALUES (?, ?, ?, ?, ?, ?)", inserts)
    if items:
        db.executemany(f"INSERT INTO {_ITEM_COLUMNS} VALUES (?, ?, ?)", items)
    return refused


_MAX_GROUP = 256  # saves per commit: bounds one transaction's statement and parameter count
# PostgreSQL's commit_delay / commit_siblings: a small group waits this long for more saves, but only
# while other responses that will be saved are being answered (`expect`), so a lone request never waits.
# Streamed Responses at c16 (~900 a second) made groups of ~5, each commit a thread hop, a GIL hand-over
# and an fsync: the wait measured +5-7 % streams a second, for at most 2 ms more before the last event.
_COMMIT_DELAY_S = 0.002
_GROUP_WORTH_WAITING_FOR = 8


class _Expected:
    """A save on its way (`expect`): it counts until saved, or until whoever holds it lets it go."""

    __slots__ = ("__weakref__",)


class SqlResponseStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._waiting: list[tuple[StoredResponse, int, asyncio.Future[None]]] = []
        self._committer: asyncio.Task[None] | None = None
        self._expected: weakref.WeakSet[_Expected] = weakref.WeakSet()

    def expect(self) -> _Expected:
        """A response being answered that will be saved: pass the token to its `save`. Held weakly, so a
        request that ends without saving (its client gone) stops counting when its token is dropped."""
        token = _Expected()
        self._expected.add(token)
        return token

    async def save(self, item: StoredResponse, expires_at: int, expected: object | None = None) -> None:
        """Durable when it returns. Saving an id again (same tenant) replaces it; an id that belongs to
        another tenant, or was deleted, raises ValueError (ids are the gateway's own, so that's a bug).
        A caller cancelled while it waits does not take its row out of the commit."""
        if expected is not None:
            self._expected.discard(expected)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, expires_at, done))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.get_running_loop().create_task(self._commit_waiting())
        await done

    async def _commit_waiting(self) -> None:
        while self._waiting:
            if len(self._waiting) < _GROUP_WORTH_WAITING_FOR and self._expected:
                await asyncio.sleep(_COMMIT_DELAY_S)
            group, self._waiting = self._waiting[:_MAX_GROUP], self._waiting[_MAX_GROUP:]
            try:
                refused = await self._write(group)
            except _DOWN as exc:
                failure: Exception | None = _unavailable(exc)
            except Exception as exc:  # noqa: BLE001 - handed to every caller of this group
                failure = exc
            else:
                failure = None
            for item, _, done in group:
                if done.done():  # its caller was cancelled
                    continue
                error = failure or refused.get(item.id)
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)

    async def _write(self, group: list[tuple[StoredResponse, int, asyncio.Future[None]]]) -> dict[str, Exception]:
        """One transaction for the group; the ids it refuses (taken by another tenant, or deleted)."""
        latest = {item.id: (item, expires_at) for item, expires_at, _ in group}  # a repeated id: the last save
        if self._db.is_sqlite:
            return await self._db.write_sqlite(partial(_write_sqlite, latest))
        refused: dict[str, Exception] = {}
        async with self._db.writing() as conn:
            found = {row.id: row for row in (await conn.execute(
                select(responses.c.id, responses.c.tenant, responses.c.deleted_at)
                .where(responses.c.id.in_(list(latest))))).all()}
            inserts: list[tuple] = []
            items: list[tuple] = []
            for response_id, (item, expires_at) in latest.items():
                body = item.response_json()
                existing = found.get(response_id)
                if existing is None:
                    inserts.append((response_id, item.tenant, item.created_at, expires_at,
                                    item.previous_response_id, body))
                elif existing.tenant != item.tenant or existing.deleted_at is not None:
                    refused[response_id] = _taken(response_id)
                    continue
                else:
                    await conn.execute(update(responses).where(responses.c.id == response_id).values(
                        tenant=item.tenant, created_at=item.created_at, expires_at=expires_at,
                        previous_response_id=item.previous_response_id, response=body, deleted_at=None))
                    await conn.execute(delete(response_input_items)
                                       .where(response_input_items.c.response_id == response_id))
                items.extend(_items(response_id, item))
            # The driver's executemany with plain tuples: SQLAlchemy's insert of a list of dicts processed
            # every row's parameters in Python.
            if inserts:
                await conn.exec_driver_sql(_PG_INSERT_RESPONSES, inserts)
            if items:
                await conn.exec_driver_sql(_PG_INSERT_ITEMS, items)
        return refused

    async def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        now = int(time.time())
        r = responses.c
        try:
            async with self._db.reading() as conn:
                row = (await conn.execute(select(r.created_at, r.previous_response_id, r.response).where(and_(
                    r.id == response_id, r.tenant == tenant, r.response.is_not(None), r.expires_at > now)))).first()
                if row is None:
                    return None
                items = (await conn.execute(select(response_input_items.c.item)
                                            .where(response_input_items.c.response_id == response_id)
                                            .order_by(response_input_items.c.position))).scalars().all()
        except _DOWN as exc:
            raise _unavailable(exc) from exc
        return StoredResponse(response_id, tenant, row.created_at, row.previous_response_id,
                              orjson.loads(row.response), [orjson.loads(item) for item in items])

    async def delete(self, tenant: str, response_id: str) -> bool:
        """True when there was something to delete (an expired response counts as gone already)."""
        now = int(time.time())
        r = responses.c
        try:
            async with self._db.writing() as conn:
                done = await conn.execute(update(responses).where(and_(
                    r.id == response_id, r.tenant == tenant, r.response.is_not(None), r.expires_at > now))
                    .values(response=None, deleted_at=now))
                if done.rowcount:
                    await conn.execute(delete(response_input_items)
                                       .where(response_input_items.c.response_id == response_id))
                return bool(done.rowcount)
        except _DOWN as exc:
            raise _unavailable(exc) from exc

    async def purge_expired(self, now: int, batch: int = 5000) -> int:
        """Drop the content of responses expired by `now`, `batch` at a time (one transaction each, so
        no statement touches more than that); returns how many were purged."""
        r = responses.c
        total = 0
        while True:
            async with self._db.writing() as conn:
                ids = (await conn.execute(select(r.id).where(and_(r.response.is_not(None), r.expires_at <= now))
                                          .order_by(r.expires_at).limit(batch))).scalars().all()
                if ids:
                    await conn.execute(update(responses).where(r.id.in_(ids)).values(response=None))
                    await conn.execute(delete(response_input_items)
                                       .where(response_input_items.c.response_id.in_(ids)))
            total += len(ids)
            if len(ids) < batch:
                return total
