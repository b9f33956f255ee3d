"""The engine: one `Database` per process, on PostgreSQL (asyncpg) or SQLite (aiosqlite).

SQLite: WAL (readers never wait for the writer), `synchronous=FULL` (a committed transaction survives a
power cut: `save()` and the ledger promise durability), a 30 s busy timeout, and write transactions
opened with BEGIN IMMEDIATE (`Database.writing`), so two writers queue on the lock instead of one
failing at its first write (SQLite cannot upgrade a deferred reader that another writer overtook).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from gateway.store.url import describe, sqlalchemy_url

T = TypeVar("T")
_WRITE = "gateway_write"
_SQLITE_PRAGMAS = ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=30000")
PG_CONNECT_TIMEOUT_S = 5
PG_COMMAND_TIMEOUT_S = 30


class Database:
    def __init__(self, url: URL, *, command_timeout_s: float = PG_COMMAND_TIMEOUT_S) -> None:
        self.url = url
        self.dialect = url.get_backend_name()  # "postgresql" or "sqlite"
        if self.is_sqlite:
            with contextlib.suppress(OSError):  # if it can't be made, connecting says why (and spools)
                Path(url.database or "").expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_async_engine(url, connect_args={"timeout": 30})
            _sqlite_events(self.engine)
        else:
            connect = {"timeout": PG_CONNECT_TIMEOUT_S, "command_timeout": command_timeout_s}
            connect.update(_asyncpg_options(url))
            self.engine = create_async_engine(url.set(query={}), pool_size=5, max_overflow=5, pool_pre_ping=True,
                                              pool_timeout=PG_CONNECT_TIMEOUT_S, connect_args=connect)
        self._writer = self.engine.execution_options(**{_WRITE: True})
        self._sqlite_thread: ThreadPoolExecutor | None = None
        self._sqlite_connection: sqlite3.Connection | None = None

    @classmethod
    def from_settings(cls, database_url: str | None, data_dir: Path, **options: float) -> "Database":
        """Raises DatabaseUrlError (a ConfigError naming GATEWAY_DATABASE_URL) for a malformed URL."""
        return cls(sqlalchemy_url(database_url, data_dir), **options)

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @property
    def display_url(self) -> str:
        return describe(self.url)

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction, committed when the block ends (rolled back on an exception)."""
        async with self._writer.begin() as conn:
            yield conn

    async def write_sqlite(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """SQLite only: `work(connection)` inside one BEGIN IMMEDIATE transaction (committed when it returns,
        rolled back when it raises), on this process's own writer connection, in its one thread. One
        thread hop per transaction: through SQLAlchemy and aiosqlite every call on the connection is one
        (about 15 for a small transaction, ~1 ms of CPU on this machine, most of a stored response's
        cost). Raises sqlite3's own errors (OperationalError: the file can't be written or locked)."""
        if self._sqlite_thread is None:
            self._sqlite_thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        return await asyncio.get_running_loop().run_in_executor(self._sqlite_thread, self._in_transaction, work)

    def _in_transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        connection = self._sqlite_connection
        if connection is None:
            connection = sqlite3.connect(self.url.database or "", timeout=30, isolation_level=None,
                                         check_same_thread=False)  # used by the writer thread only
            for pragma in _SQLITE_PRAGMAS:
                connection.execute(f"PRAGMA {pragma}")
            self._sqlite_connection = connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            result = work(connection)
            connection.execute("COMMIT")
        except BaseException:
            # Never leave the connection inside a transaction (a failed COMMIT included): the next
            # BEGIN would fail, and every later write with it.
            if connection.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    connection.execute("ROLLBACK")
            raise
        return result

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self._sqlite_thread is not None:
            thread, self._sqlite_thread = self._sqlite_thread, None
            await asyncio.get_running_loop().run_in_executor(thread, self._close_sqlite)
            thread.shutdown(wait=False)

    def _close_sqlite(self) -> None:
        if self._sqlite_connection is not None:
            self._sqlite_connection.close()
            self._sqlite_connection = None


def _asyncpg_options(url: URL) -> dict:
    """libpq parameters (translated in url.py) as asyncpg's connect arguments."""
    options: dict = {}
    query = dict(url.query)
    if "ssl" in query:
        options["ssl"] = query["ssl"]
    if "timeout" in query:
        options["timeout"] = int(query["timeout"])
    if "application_name" in query:
        options["server_settings"] = {"application_name": query["application_name"]}
    return options


def _sqlite_events(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # the driver's own BEGIN is replaced by ours below
        cursor = dbapi_connection.cursor()
        for pragma in _SQLITE_PRAGMAS:
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")
