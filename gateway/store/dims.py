"""Dimension tables: the repeated strings of ledger and decision rows, stored once, referred to by id.

The id cache is filled only from committed rows (each new dimension is inserted in its own short
transaction first): an id seen inside a transaction that later rolled back would point at nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Table, select
from sqlalchemy.dialects import postgresql, sqlite

from gateway.store.database import Database

Dim = tuple[str, ...]


def insert(db: Database, table: Table) -> Any:
    """The dialect's INSERT, which has on_conflict_do_nothing / on_conflict_do_update."""
    return (sqlite.insert if db.is_sqlite else postgresql.insert)(table)


class Dimensions:
    def __init__(self, db: Database, table: Table, columns: tuple[str, ...]) -> None:
        self._db, self._table, self._columns = db, table, columns
        self._ids: dict[Dim, int] = {}

    async def ids(self, dims: Iterable[Dim]) -> dict[Dim, int]:
        """The id of every one of `dims` (inserting the new ones); the mapping also holds others."""
        missing = sorted({dim for dim in dims if dim not in self._ids})
        if missing:
            async with self._db.writing() as conn:
                await conn.execute(insert(self._db, self._table).on_conflict_do_nothing(),
                                   [dict(zip(self._columns, dim)) for dim in missing])
            await self.reload()
        return self._ids

    async def reload(self) -> None:
        columns = [self._table.c[name] for name in self._columns]
        async with self._db.reading() as conn:
            rows = (await conn.execute(select(self._table.c.id, *columns))).all()
        self._ids = {tuple(row[1:]): row[0] for row in rows}
