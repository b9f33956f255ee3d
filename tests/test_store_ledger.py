"""The usage ledger's durability: idempotent writes, the spool, SIGTERM and kill -9, on SQLite and on a real
PostgreSQL (and a PostgreSQL server stopped and started mid-test)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from gateway.store.database import Database
from gateway.store.ledger import Ledger
from tests.support.postgres import PostgresCluster
from tests.support.processes import free_port
from tests.support.store_fixtures import db_url, migrated, need_initdb, pg_cluster, request_id, row  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


async def _counts(db: Database) -> tuple[int, int, list[int]]:
    """(ledger rows, distinct request ids, requests in the minute/hour/day rollups)."""
    async with db.reading() as conn:
        rows = (await conn.execute(text("SELECT count(*), count(DISTINCT request_id) FROM usage_ledger"))).one()
        rollups = [int((await conn.execute(text(f"SELECT coalesce(sum(requests), 0) FROM usage_{w}"))).scalar())
                   for w in ("1m", "1h", "1d")]
    return int(rows[0]), int(rows[1]), rollups


async def _request_ids(db: Database) -> set[str]:
    async with db.reading() as conn:
        return {str(value).replace("-", "") for value in
                (await conn.execute(text("SELECT request_id FROM usage_ledger"))).scalars()}


def _unreachable(db_url: str, tmp_path: Path) -> str:
    """A URL of the same kind whose database can't be opened."""
    if db_url.startswith("sqlite"):
        (tmp_path / "not-a-directory").write_text("")
        return f"sqlite:///{tmp_path}/not-a-directory/gateway.db"
    return f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"


def test_a_batch_replayed_after_its_commit_counts_once(db_url: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"

    async def scenario() -> None:
        # The database is down: 50 rows go to the spool, and stay there through close().
        down = Database.from_settings(_unreachable(db_url, tmp_path), tmp_path)
        ledger = Ledger(down, spool, interval_s=0.05)
        await ledger.start()
        for i in range(50):
            ledger.record(row(i))
        await ledger.close(timeout=0.3)
        await down.dispose()
        assert ledger.healthy is False and ledger.writer.written_rows == 0
        files = sorted(spool.glob("*.batch"))
        assert files
        saved = tmp_path / "copies"
        saved.mkdir()
        for path in files:
            shutil.copy2(path, saved / path.name)

        db = await migrated(db_url, tmp_path)
        try:
            # It's back: a new process replays the spool.
            replay = Ledger(db, spool, interval_s=0.05)
            await replay.start()
            assert await replay.flush(10)
            await replay.close()
            assert await _counts(db) == (50, 50, [50, 50, 50])
            assert not list(spool.glob("*.batch"))
            # As if those commits' acknowledgements had been lost: the same batches replayed again.
            for path in saved.iterdir():
                shutil.copy2(path, spool / path.name)
            again = Ledger(db, spool, interval_s=0.05)
            await again.start()
            assert await again.flush(10)
            await again.close()
            assert again.writer.written_rows > 0  # it did write them (and the database ignored them)
            assert await _counts(db) == (50, 50, [50, 50, 50])
            assert not list(spool.glob("*.batch"))
        finally:
            await db.dispose()

    asyncio.run(scenario())


def test_close_writes_every_recorded_row(db_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        db = await migrated(db_url, tmp_path)
        try:
            ledger = Ledger(db, tmp_path / "spool", interval_s=3600)  # no tick before close
            await ledger.start()
            for i in range(3000):
                ledger.record(row(i))
            await ledger.close()
            assert await _counts(db) == (3000, 3000, [3000, 3000, 3000])
            assert not list((tmp_path / "spool").glob("*.batch"))
        finally:
            await db.dispose()

    asyncio.run(scenario())


def _start_writer(db_url: str, data_dir: Path, interval_s: float, rate: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "tests.support.store_worker", "write", db_url, str(data_dir),
                             str(interval_s), str(rate)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _recorded_until(proc: subprocess.Popen, count: int, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("recorded ") and int(line.split()[1]) >= count:
            return int(line.split()[1])
        assert time.monotonic() < deadline, "the writer process is too slow"
    raise AssertionError(f"writer exited: {proc.stderr.read() if proc.stderr else ''}")


def test_kill_9_loses_at_most_the_last_flush_interval(db_url: str, tmp_path: Path) -> None:
    interval, rate = 0.5, 200.0
    asyncio.run(_dispose(migrated(db_url, tmp_path)))
    proc = _start_writer(db_url, tmp_path, interval, rate)
    try:
        _recorded_until(proc, 500)
    finally:
        proc.send_signal(signal.SIGKILL)
    rest, _ = proc.communicate(timeout=30)
    recorded = max([500] + [int(line.split()[1]) for line in rest.splitlines() if line.startswith("recorded ")])

    async def replayed() -> tuple[tuple, set[str]]:
        db = Database.from_settings(db_url, tmp_path)
        ledger = Ledger(db, tmp_path / "spool" / "ledger", interval_s=interval)
        await ledger.start()  # replays what the killed process had spooled
        assert await ledger.flush(10)
        await ledger.close()
        try:
            return await _counts(db), await _request_ids(db)
        finally:
            await db.dispose()

    (rows, distinct, rollups), ids = asyncio.run(replayed())
    # What survived is exactly the first `rows` requests (each once), and the rollups agree with it.
    assert rows == distinct and rollups == [rows] * 3
    assert ids == {request_id(i) for i in range(rows)}
    # Lost: only the rows recorded after the last tick's spool write (one interval, plus scheduling slack).
    assert 0 <= recorded - rows <= rate * (interval + 0.5), (recorded, rows)
    assert rows >= 300


async def _dispose(opening) -> None:  # type: ignore[no-untyped-def]
    db = await opening
    await db.dispose()


def test_sigterm_loses_nothing(db_url: str, tmp_path: Path) -> None:
    asyncio.run(_dispose(migrated(db_url, tmp_path)))
    proc = _start_writer(db_url, tmp_path, 30.0, 300.0)  # a long interval: everything is still in memory
    _recorded_until(proc, 400)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    closed = [int(line.split()[1]) for line in out.splitlines() if line.startswith("closed ")]
    assert proc.returncode == 0 and closed, err

    async def counted() -> tuple:
        db = Database.from_settings(db_url, tmp_path)
        try:
            return await _counts(db)
        finally:
            await db.dispose()

    assert asyncio.run(counted()) == (closed[0], closed[0], [closed[0]] * 3)
    assert not list((tmp_path / "spool" / "ledger").glob("*.batch"))


def test_postgres_stopped_mid_run_nothing_lost_nothing_doubled(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    need_initdb()
    cluster = PostgresCluster()  # its own server: this test stops it
    caplog.set_level(logging.WARNING, logger="gateway.store")
    try:
        url = cluster.create_database()
        outages: list[bool] = []

        async def scenario() -> None:
            db = await migrated(url, tmp_path)
            ledger = Ledger(db, tmp_path / "spool", interval_s=0.2, on_outage=outages.append)
            await ledger.start()
            for i in range(100):
                ledger.record(row(i))
            assert await ledger.flush(10)
            await asyncio.to_thread(cluster.stop, "immediate")
            for i in range(100, 250):  # the request path goes on, unaware
                ledger.record(row(i))
                await asyncio.sleep(0.005)
            await _until(lambda: not ledger.healthy and ledger.writer.waiting_rows == 150, 15)
            assert outages == [True]
            assert list((tmp_path / "spool").glob("*.batch"))  # durable while it's down
            await asyncio.to_thread(cluster.start)
            await _until(lambda: ledger.healthy and ledger.writer.waiting_rows == 0, 30)
            assert outages == [True, False]
            assert ledger.writer.spooled_rows >= 1 and ledger.writer.written_rows == 250
            await ledger.close()
            assert await _counts(db) == (250, 250, [250, 250, 250])
            assert await _request_ids(db) == {request_id(i) for i in range(250)}
            await db.dispose()

        asyncio.run(scenario())
        down = [r for r in caplog.records if "database not writable" in r.getMessage()]
        back = [r for r in caplog.records if "writable again" in r.getMessage()]
        assert len(down) == 1 and len(back) == 1  # one line each per outage, not one per retry
    finally:
        cluster.close()


async def _until(condition, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_a_batch_the_database_refuses_is_set_aside_and_the_rest_is_written(db_url: str, tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    dims = [["acme", "k1", "m", "m", "llama2", "conditional", "production", "[]", "chat", "engine"]]
    bad = {"dims": dims, "rows": [[None, int(time.time() * 1000), 0, 1, 1, 200, 5]]}  # no request id
    (spool / "00000000000000000001-1-00000000.batch").write_bytes(__import__("orjson").dumps(bad))

    async def scenario() -> None:
        db = await migrated(db_url, tmp_path)
        try:
            ledger = Ledger(db, spool, interval_s=0.05)
            await ledger.start()
            for i in range(20):
                ledger.record(row(i))
            assert await ledger.flush(10)
            await ledger.close()
            assert ledger.writer.rejected_rows == 1 and ledger.healthy  # refused content is not an outage
            assert await _counts(db) == (20, 20, [20, 20, 20])
        finally:
            await db.dispose()

    asyncio.run(scenario())
    assert [p.name for p in (spool / "rejected").iterdir()] == ["00000000000000000001-1-00000000.batch"]
    assert any("refused a batch of 1 rows" in r.getMessage() for r in caplog.records)


def test_a_request_recorded_twice_counts_once(db_url: str, tmp_path: Path) -> None:
    """Idempotent on the request id: the same request in two batches (two replicas replaying one spool,
    or a record written again) is one ledger row and counted once in the rollups."""

    async def scenario() -> None:
        db = await migrated(db_url, tmp_path)
        try:
            ledger = Ledger(db, tmp_path / "spool", interval_s=3600)
            await ledger.start()
            for i in range(10):
                ledger.record(row(i))
            assert await ledger.flush(10)
            for i in range(5, 15):  # 5..9 again, in a later batch; 10..14 new
                ledger.record(row(i))
            ledger.record(row(14))  # and twice in one batch
            assert await ledger.flush(10)
            await ledger.close()
            assert await _counts(db) == (15, 15, [15, 15, 15])
            assert await _request_ids(db) == {request_id(i) for i in range(15)}
        finally:
            await db.dispose()

    asyncio.run(scenario())
