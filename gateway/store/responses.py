"""Stored responses for the Responses API (`previous_response_id`, GET/DELETE /v1/responses/{id}).

`save` commits before it returns, so a follow-up sent the moment a response completed, to any replica,
finds it (LiteLLM batches these writes, and its follow-ups fail for ~10 s: BerriAI/litellm#28587).
Saves that arrive while a commit is in flight share the next one (group commit): each still returns
only once its row is durable, but 64 concurrent responses cost one commit (one fsync on SQLite), not 64
in a row (one transaction each held the embedded database to ~100 saves a second here).
A response belongs to its tenant: another tenant's id answers None, as a missing one does, so nothing
tells that it exists. Expired or deleted responses lose their content (response NULL, input items
deleted); the row stays as a tombstone so the id is never reused. When the database is down `save`,
`get` and `delete` raise `StoreUnavailable` (the caller answers 503); nothing is spooled: a
conversation state the client cannot use right away is no use later.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
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


class ResponseStore(Protocol):
    async def save(self, item: StoredResponse, expires_at: int) -> None: ...
    async def get(self, tenant: str, response_id: str) -> StoredResponse | None: ...
    async def delete(self, tenant: str, response_id: str) -> bool: ...
    async def purge_expired(self, now: int, batch: int = 5000) -> int: ...


def _unavailable(error: Exception) -> StoreUnavailable:
    return StoreUnavailable(f"response store unavailable: {str(getattr(error, 'orig', None) or error)[:200]}")


_DOWN = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, OSError, TimeoutError)


_MAX_GROUP = 256  # saves per commit: bounds one transaction's statement and parameter count


class SqlResponseStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._waiting: list[tuple[StoredResponse, int, asyncio.Future[None]]] = []
        self._committer: asyncio.Task[None] | None = None

    async def save(self, item: StoredResponse, expires_at: int) -> None:
        """Durable when it returns. Saving an id again (same tenant) replaces it; an id that belongs to
        another tenant, or was deleted, raises ValueError (ids are the gateway's own, so that's a bug).
        A caller cancelled while it waits does not take its row out of the commit."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, expires_at, done))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.get_running_loop().create_task(self._commit_waiting())
        await done

    async def _commit_waiting(self) -> None:
        while self._waiting:
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
        refused: dict[str, Exception] = {}
        async with self._db.writing() as conn:
            found = {row.id: row for row in (await conn.execute(
                select(responses.c.id, responses.c.tenant, responses.c.deleted_at)
                .where(responses.c.id.in_(list(latest))))).all()}
            inserts, items = [], []
            for response_id, (item, expires_at) in latest.items():
                row = {"tenant": item.tenant, "created_at": item.created_at, "expires_at": expires_at,
                       "previous_response_id": item.previous_response_id,
                       "response": orjson.dumps(item.response).decode(), "deleted_at": None}
                existing = found.get(response_id)
                if existing is None:
                    inserts.append({"id": response_id, **row})
                elif existing.tenant != item.tenant or existing.deleted_at is not None:
                    refused[response_id] = ValueError(f"response id {response_id} is taken")
                    continue
                else:
                    await conn.execute(update(responses).where(responses.c.id == response_id).values(**row))
                    await conn.execute(delete(response_input_items)
                                       .where(response_input_items.c.response_id == response_id))
                items.extend({"response_id": response_id, "position": i, "item": orjson.dumps(entry).decode()}
                             for i, entry in enumerate(item.input_items))
            if inserts:
                await conn.execute(responses.insert(), inserts)
            if items:
                await conn.execute(response_input_items.insert(), items)
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
