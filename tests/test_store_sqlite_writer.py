"""Database.write_sqlite: the embedded file's one-hop writer (stored responses use it). A transaction
that fails, in its work or at its statements, leaves nothing behind and never blocks the next one."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gateway.store.database import Database
from gateway.store.responses import SqlResponseStore, StoredResponse
from tests.support.store_fixtures import migrated


def _insert(response_id: str):  # type: ignore[no-untyped-def]
    def work(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO responses (id, tenant, created_at, expires_at, response) VALUES (?, 't', 1, 9, '{}')",
                     (response_id,))
    return work


def test_a_failed_transaction_is_rolled_back_and_the_next_one_commits(tmp_path: Path) -> None:
    async def scenario() -> None:
        db = await migrated(f"sqlite:///{tmp_path / 'gateway.db'}", tmp_path)
        try:
            await db.write_sqlite(_insert("resp_a"))

            def fails_after_writing(conn: sqlite3.Connection) -> None:
                _insert("resp_b")(conn)
                raise RuntimeError("the work itself failed")

            with pytest.raises(RuntimeError):
                await db.write_sqlite(fails_after_writing)
            with pytest.raises(sqlite3.IntegrityError):  # the statement fails: a duplicate id
                await db.write_sqlite(_insert("resp_a"))
            await db.write_sqlite(_insert("resp_c"))  # neither failure left a transaction open
            store = SqlResponseStore(db)
            await store.save(StoredResponse("resp_d", "t", 1, None, {"id": "resp_d"}, []), 2**40)
            ids = await db.write_sqlite(
                lambda conn: [r for (r,) in conn.execute("SELECT id FROM responses ORDER BY id")])
            assert ids == ["resp_a", "resp_c", "resp_d"]  # resp_b was rolled back
            assert (await store.get("t", "resp_d")) is not None  # what the writer committed, the pool reads
        finally:
            await db.dispose()

    asyncio.run(scenario())


def test_an_unwritable_file_is_the_stores_unavailable_error(tmp_path: Path) -> None:
    from gateway.store.responses import StoreUnavailable

    async def scenario() -> None:
        (tmp_path / "missing-dir").write_text("a file where the directory should be")
        db = Database.from_settings(f"sqlite:///{tmp_path / 'missing-dir' / 'x' / 'gateway.db'}", tmp_path)
        try:
            with pytest.raises(StoreUnavailable):
                await SqlResponseStore(db).save(StoredResponse("resp_e", "t", 1, None, {}, []), 2**40)
        finally:
            await db.dispose()

    asyncio.run(scenario())
