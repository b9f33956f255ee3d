"""The `Store` as the gateway opens it: everything through one object, a database that is down at start
(the gateway still starts, and catches up), and the fail-closed signal when nothing can be made durable."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from gateway.settings import Settings
from gateway.store import store as store_mod
from gateway.store.database import Database
from gateway.store.decisions import DecisionRow
from gateway.store.ledger import Ledger
from gateway.store.store import Store
from tests.support.postgres import PostgresCluster
from tests.support.processes import free_port
from tests.support.store_fixtures import db_url, need_initdb, pg_cluster, row  # noqa: F401


def _settings(url: str | None, data_dir: Path) -> Settings:
    return Settings(_env_file=None, database_url=url, data_dir=data_dir, store_flush_interval_s=0.1)


def test_one_store_records_reads_and_closes(db_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        store = await Store.open(_settings(db_url, tmp_path))
        try:
            assert store.healthy and store.durable
            now = time.time()
            for i in range(10):
                store.ledger.record(row(i, when=now, tokens=(3, 4)))
                store.decisions.record(DecisionRow(f"{i:032x}", now, "acme", "k1", "llama-2-7b-chat", "llama-2-7b-chat",
                                                   "llama2", "allow", "env-allows"))
            minute = int(now) // 60 * 60
            buckets = await store.usage_buckets("1m", [minute])  # flushes this replica's rows first
            assert buckets == {minute: {("acme", "k1", "llama-2-7b-chat", "llama2"): [30, 40, 10]}}
            assert (await store.period_usage("acme")).day_used == 70
            made = await store.keys.create("acme", "ci")
            assert store.keys.lookup(made.record.key_hash) is not None
            assert await store.decisions.flush(5)
            assert len((await store.decisions.search(tenant="acme")).data) == 10
        finally:
            await store.close()

    asyncio.run(scenario())


def test_the_default_is_an_sqlite_file_in_the_data_dir(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = await Store.open(_settings(None, tmp_path))
        store.ledger.record(row(1))
        await store.close()

    asyncio.run(scenario())
    assert (tmp_path / "gateway.db").is_file()


def test_a_database_down_at_start_is_caught_up_with_when_it_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need_initdb()
    monkeypatch.setattr(store_mod, "MIGRATE_RETRY_S", 0.2)
    cluster = PostgresCluster()
    try:
        cluster.stop("immediate")

        async def scenario() -> None:
            store = await Store.open(_settings(cluster.url(), tmp_path))  # no exception: it serves on the spool
            try:
                assert not store.schema_ready
                for i in range(40):
                    store.ledger.record(row(i))
                await asyncio.sleep(0.5)
                assert not store.healthy and store.durable  # down, but the spool holds the rows
                await asyncio.to_thread(cluster.start)
                deadline = time.monotonic() + 30
                while not (store.schema_ready and store.healthy and store.ledger.writer.waiting_rows == 0):
                    assert time.monotonic() < deadline, "did not catch up"
                    await asyncio.sleep(0.1)
                async with store.db.reading() as conn:
                    assert (await conn.execute(text("SELECT count(*) FROM usage_ledger"))).scalar() == 40
            finally:
                await store.close()

        asyncio.run(scenario())
    finally:
        cluster.close()


def test_nowhere_to_write_is_not_durable_and_memory_stays_bounded(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")

    async def scenario() -> None:
        db = Database.from_settings(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere", tmp_path)
        ledger = Ledger(db, tmp_path / "a-file" / "spool", interval_s=0.05)  # a spool that can't be made
        ledger.writer.max_memory_rows = 100
        await ledger.start()
        try:
            for i in range(60):
                ledger.record(row(i))
            await asyncio.sleep(0.6)
            assert not ledger.writer.durable  # GATEWAY_AUDIT_FAIL_CLOSED refuses production requests now
            for i in range(60, 200):
                ledger.record(row(i))
            await asyncio.sleep(0.3)
            assert ledger.writer.dropped_rows > 0 and ledger.writer.waiting_rows <= 100
        finally:
            await ledger.close(timeout=0.2)
            await db.dispose()

    asyncio.run(scenario())
