"""Console sessions in the database (gateway/store/sessions.py), on SQLite and on a real PostgreSQL: tokens
are random and stored only hashed, every replica sees a session and its deletion at once, and expired
sessions are refused and purged."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from gateway.store.sessions import SessionStore
from tests.support.store_fixtures import db_url, migrated, pg_cluster  # noqa: F401


def test_a_session_is_found_by_its_token_on_any_replica_until_deleted(db_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        a_db, b_db = await migrated(db_url, tmp_path), await migrated(db_url, tmp_path)
        a, b = SessionStore(a_db), SessionStore(b_db)
        try:
            token, expires_at = await a.create("acme", "1a2b3c4d", is_admin=False, ttl_s=3600)
            other, _ = await a.create("ops", "ffff0000", is_admin=True, ttl_s=3600)
            assert len(token) >= 40 and token != other and abs(expires_at - (time.time() + 3600)) < 5
            found = await b.get(token)  # another replica, at once
            assert found is not None and (found.tenant, found.key_id, found.is_admin) == ("acme", "1a2b3c4d", False)
            assert (await b.get(other)).is_admin is True
            async with a_db.reading() as conn:
                stored = [row[0] for row in (await conn.execute(text("SELECT token_hash FROM console_sessions")))]
            assert token not in " ".join(stored) and all(h.startswith("sha256:") for h in stored)
            assert await b.get(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
            assert await b.get("") is None and await b.get("x" * 10_000) is None
            assert await a.delete(token) is True and await b.get(token) is None  # signed out everywhere
            assert await a.delete(token) is False
            assert await a.delete_for_key("ffff0000") == 1 and await b.get(other) is None
            with pytest.raises(ValueError):
                await a.create("acme", "1a2b3c4d", is_admin=False, ttl_s=0)
        finally:
            await a_db.dispose()
            await b_db.dispose()

    asyncio.run(scenario())


def test_expired_sessions_are_refused_and_purged_in_batches(db_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        db = await migrated(db_url, tmp_path)
        sessions = SessionStore(db)
        try:
            short = [await sessions.create("acme", "k", is_admin=False, ttl_s=1) for _ in range(7)]
            kept, _ = await sessions.create("acme", "k", is_admin=False, ttl_s=600)
            await asyncio.sleep(1.2)
            assert await sessions.get(short[0][0]) is None  # expired: refused before any purge
            assert await sessions.purge_expired(batch=3) == 7
            assert await sessions.get(kept) is not None and await sessions.purge_expired() == 0
        finally:
            await db.dispose()

    asyncio.run(scenario())
