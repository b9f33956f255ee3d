"""Stored responses (the Responses API's state): durable on return and visible to another replica at once,
scoped to their tenant, gone when expired or deleted; on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from gateway.store.responses import SqlResponseStore, StoredResponse, StoreUnavailable
from gateway.store.database import Database
from tests.support.processes import free_port
from tests.support.store_fixtures import db_url, migrated, pg_cluster  # noqa: F401


def _response(rid: str, tenant: str = "acme", previous: str | None = None) -> StoredResponse:
    body = {"id": rid, "object": "response", "status": "completed", "model": "llama-2-7b-chat",
            "output": [{"type": "message", "id": f"msg_{rid}", "role": "assistant",
                        "content": [{"type": "output_text", "text": "Bonjour — ça va ? 🙂", "annotations": []}]}]}
    items = [{"id": f"in_{rid}_0", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
             {"id": f"in_{rid}_1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "?"}]}]
    return StoredResponse(rid, tenant, int(time.time()), previous, body, items)


def test_saved_is_readable_at_once_by_another_replica_and_only_by_its_tenant(db_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        db_a, db_b = await migrated(db_url, tmp_path), await migrated(db_url, tmp_path)
        a, b = SqlResponseStore(db_a), SqlResponseStore(db_b)
        try:
            first = _response("resp_1")
            await a.save(first, expires_at=int(time.time()) + 3600)
            assert await b.get("acme", "resp_1") == first  # no wait: committed when save returned
            follow = _response("resp_2", previous="resp_1")
            await b.save(follow, expires_at=int(time.time()) + 3600)
            assert (await a.get("acme", "resp_2")).previous_response_id == "resp_1"
            again = _response("resp_2", previous="resp_1")  # its tenant saving an id again: replaced
            again.response["status"] = "incomplete"
            await a.save(again, expires_at=int(time.time()) + 3600)
            assert (await b.get("acme", "resp_2")).response["status"] == "incomplete"
            assert await a.get("globex", "resp_1") is None  # another tenant's: as if missing
            assert await b.delete("globex", "resp_1") is False
            assert await a.get("acme", "resp_404") is None

            assert await a.delete("acme", "resp_1") is True
            assert await b.get("acme", "resp_1") is None
            assert await b.delete("acme", "resp_1") is False
            with pytest.raises(ValueError):  # a tombstoned id is never reused
                await a.save(_response("resp_1"), expires_at=int(time.time()) + 3600)
            with pytest.raises(ValueError):
                await a.save(_response("resp_2", tenant="globex"), expires_at=int(time.time()) + 3600)
            async with db_a.reading() as conn:
                content = (await conn.execute(text("SELECT response FROM responses WHERE id = 'resp_1'"))).scalar()
                items = (await conn.execute(text("SELECT count(*) FROM response_input_items "
                                                 "WHERE response_id = 'resp_1'"))).scalar()
            assert content is None and items == 0  # deleted: the content is gone, not just hidden
        finally:
            await db_a.dispose()
            await db_b.dispose()

    asyncio.run(scenario())


def test_concurrent_saves_share_commits_and_each_is_readable_elsewhere_when_it_returns(
        db_url: str, tmp_path: Path) -> None:
    """64 responses finishing at once (c64 on the Responses API): every save returns only once another
    replica can read it, a refused id fails only its own save, and the group takes a few commits, not 64."""
    async def scenario() -> None:
        db_a, db_b = await migrated(db_url, tmp_path), await migrated(db_url, tmp_path)
        a, b = SqlResponseStore(db_a), SqlResponseStore(db_b)
        expires = int(time.time()) + 3600
        try:
            await a.save(_response("resp_other", tenant="globex"), expires_at=expires)
            commits = 0
            writing = db_a.writing

            def counted():  # noqa: ANN202
                nonlocal commits
                commits += 1
                return writing()

            db_a.writing = counted  # type: ignore[method-assign]

            async def save_then_read_elsewhere(rid: str) -> StoredResponse | None:
                await a.save(_response(rid), expires_at=expires)
                return await b.get("acme", rid)

            ids = [f"resp_c{i}" for i in range(64)]
            results = await asyncio.gather(*map(save_then_read_elsewhere, ids),
                                           a.save(_response("resp_other"), expires_at=expires),
                                           return_exceptions=True)
            assert [r.id if isinstance(r, StoredResponse) else r for r in results[:64]] == ids
            assert isinstance(results[64], ValueError)  # another tenant's id: only this save fails
            assert (await b.get("globex", "resp_other")).tenant == "globex"
            assert commits <= 8, commits
        finally:
            await db_a.dispose()
            await db_b.dispose()

    asyncio.run(scenario())


def test_a_save_waits_to_share_a_commit_only_while_other_saves_are_expected(db_url: str,
                                                                           tmp_path: Path) -> None:
    """Group commit with PostgreSQL's commit_delay rule: while another response being answered will be saved
    (`expect`), a small group waits a moment, so a save 0.5 ms later shares its commit; a lone save never
    waits (that second save takes a commit of its own); a token dropped unsaved (the client went away)
    stops counting."""
    async def scenario() -> None:
        db = await migrated(db_url, tmp_path)
        store = SqlResponseStore(db)
        commits = 0
        for name in ("write_sqlite", "writing"):  # SQLite's writer thread, or a PostgreSQL transaction
            real = getattr(db, name)

            def counted(*args, _real=real):  # noqa: ANN002, ANN202
                nonlocal commits
                commits += 1
                return _real(*args)

            setattr(db, name, counted)
        expires = int(time.time()) + 3600

        async def two_saves(tag: str) -> int:
            nonlocal commits
            commits = 0

            async def second() -> None:
                await asyncio.sleep(0.0005)
                await store.save(_response(f"resp_{tag}_2"), expires_at=expires)

            await asyncio.gather(store.save(_response(f"resp_{tag}_1"), expires_at=expires), second())
            return commits

        try:
            assert await two_saves("alone") == 2
            elsewhere = store.expect()  # a stream still being answered
            assert await two_saves("siblings") == 1
            mine = store.expect()
            await store.save(_response("resp_mine"), expires_at=expires, expected=mine)  # counted out when saved
            del elsewhere  # its request ended without a save
            assert await two_saves("dropped") == 2
            assert (await store.get("acme", "resp_siblings_2")) is not None
        finally:
            await db.dispose()

    asyncio.run(scenario())


def test_expired_responses_are_not_served_and_are_purged_in_batches(db_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        db = await migrated(db_url, tmp_path)
        store = SqlResponseStore(db)
        try:
            now = int(time.time())
            for i in range(7):
                await store.save(_response(f"resp_old{i}"), expires_at=now - 1)
            await store.save(_response("resp_live"), expires_at=now + 3600)
            assert await store.get("acme", "resp_old0") is None  # expired: not served even before the purge
            assert await store.purge_expired(now, batch=3) == 7
            assert await store.purge_expired(now, batch=3) == 0
            assert (await store.get("acme", "resp_live")).response["output"][0]["content"][0]["text"].startswith("Bonjour")
            async with db.reading() as conn:
                left = (await conn.execute(text("SELECT count(*) FROM response_input_items"))).scalar()
                kept = (await conn.execute(text("SELECT count(*) FROM responses WHERE response IS NOT NULL"))).scalar()
            assert left == 2 and kept == 1
        finally:
            await db.dispose()

    asyncio.run(scenario())


def test_an_unreachable_database_is_an_exception_the_caller_can_answer_503_for(tmp_path: Path) -> None:
    async def scenario() -> None:
        db = Database.from_settings(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere", tmp_path)
        store = SqlResponseStore(db)
        try:
            with pytest.raises(StoreUnavailable):
                await store.save(_response("resp_x"), expires_at=int(time.time()) + 60)
            with pytest.raises(StoreUnavailable):
                await store.get("acme", "resp_x")
        finally:
            await db.dispose()

    asyncio.run(scenario())
