"""`Store`: the database and everything kept in it, opened once per process.

    store = await Store.open(settings)        # migrates (under the lock), starts the background tasks
    store.ledger.record(LedgerRow(...))       # request path: a list append
    store.decisions.record(DecisionRow(...))  # request path: a list append
    store.keys.lookup(key_hash)               # request path: a dict lookup
    await store.usage_page("1h", starts, 2000, group_by=["tenant"])  # the usage API (bounded pages)
    await store.sessions.get(token)           # the console
    await store.close()                       # SIGTERM, after the drain: loses nothing

A database that can't be reached at start doesn't stop the gateway: rows go to the spool, the store is
unhealthy, and the migrations are retried in the background until it answers. A malformed URL
(DatabaseUrlError) or a schema newer than the code (SchemaTooNew) does stop it: those need a person.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.store import migrate, queries, retention
from gateway.store.batches import BatchWriter
from gateway.store.database import Database
from gateway.store.decisions import Decisions
from gateway.store.keys import KeyStore
from gateway.store.ledger import Ledger
from gateway.store.responses import _DOWN, SqlResponseStore, StoreUnavailable
from gateway.store.sessions import SessionStore

if TYPE_CHECKING:
    from gateway.settings import Settings

log = logging.getLogger("gateway.store")
MIGRATE_RETRY_S = 5.0
RETENTION_INTERVAL_S = 3600.0
READ_FLUSH_TIMEOUT_S = 2.0


class _Outages:
    """One log line when the database becomes unreachable for any part of the store (ledger writes,
    decision writes, key reads), one when every part reaches it again, and their count."""

    def __init__(self, display_url: str, spool: Path, on_outage: Callable[[str, bool], None] | None) -> None:
        self._url, self._spool, self._on_outage = display_url, spool, on_outage
        self.down: set[str] = set()
        self.count = 0

    def report(self, part: str, down: bool, reason: str = "") -> None:
        was_down = bool(self.down)
        if down:
            self.down.add(part)
        else:
            self.down.discard(part)
        if down and not was_down:
            self.count += 1
            log.error("database %s unreachable (%s: %s): ledger rows and policy decisions wait in the spool %s, "
                      "API keys are served as last read; requests go on", self._url, part, reason or "no answer",
                      self._spool)
        elif was_down and not self.down:
            log.warning("database %s reachable again; the spool is being written to it", self._url)
        if self._on_outage is not None:
            self._on_outage(part, down)


class Store:
    def __init__(self, db: Database, data_dir: Path, *, flush_interval_s: float = 1.0, ledger_retention_days: int = 90,
                 on_outage: Callable[[str, bool], None] | None = None) -> None:
        self.db = db
        self.ledger_retention_days = ledger_retention_days
        spool = data_dir / "spool"
        self._outages = _Outages(db.display_url, spool, on_outage)

        def hook(name: str, writer: Callable[[], object]) -> Callable[[bool], None]:
            return lambda down: self._outages.report(name, down, getattr(writer(), "last_error", ""))

        self.ledger = Ledger(db, spool / "ledger", interval_s=flush_interval_s, log_outages=False,
                             on_outage=hook("ledger", lambda: self.ledger.writer))
        self.decisions = Decisions(db, spool / "decisions", interval_s=flush_interval_s, log_outages=False,
                                   on_outage=hook("decisions", lambda: self.decisions.writer))
        self.keys = KeyStore(db, on_outage=lambda down, reason: self._outages.report("keys", down, reason))
        self.responses = SqlResponseStore(db)
        self.sessions = SessionStore(db)
        self.schema_ready = False
        self.closed = False
        self._tasks: list[asyncio.Task] = []

    @classmethod
    async def open(cls, settings: "Settings", *, apply_migrations: bool = True,
                   on_outage: Callable[[str, bool], None] | None = None) -> "Store":
        """Raises DatabaseUrlError or SchemaTooNew; an unreachable database only degrades it."""
        db = Database.from_settings(settings.database_url, settings.data_dir)
        store = cls(db, settings.data_dir, flush_interval_s=settings.store_flush_interval_s,
                    ledger_retention_days=settings.ledger_retention_days, on_outage=on_outage)
        try:
            await store._prepare_schema(apply_migrations)
        except migrate.SchemaTooNew:
            await db.dispose()
            raise
        except Exception as exc:  # unreachable: serve anyway, on the spool
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            store.ledger.writer.mark_down(reason)  # unhealthy from the start, not from the first failed write
            store.decisions.writer.mark_down(reason)
        await store.start(apply_migrations)
        return store

    async def _prepare_schema(self, apply_migrations: bool) -> None:
        if apply_migrations:
            await migrate.upgrade(self.db)
        else:
            found = await migrate.check(self.db)
            if not found.up_to_date:
                raise RuntimeError(f"database schema is at {found.current}, this gateway needs {found.head}: "
                                   "run `gateway db upgrade`")
        self.schema_ready = True

    async def start(self, apply_migrations: bool = True) -> None:
        await self.ledger.start()
        await self.decisions.start()
        await self.keys.start()
        loop = asyncio.get_running_loop()
        if not self.schema_ready:
            self._tasks.append(loop.create_task(self._retry_schema(apply_migrations)))
        self._tasks.append(loop.create_task(self._retention_loop()))

    async def _retry_schema(self, apply_migrations: bool) -> None:
        while not self.schema_ready:
            await asyncio.sleep(MIGRATE_RETRY_S)
            try:
                await self._prepare_schema(apply_migrations)
                log.info("database %s: schema ready", self.db.display_url)
                for writer in self.writers.values():
                    writer.mark_up_if_idle()
            except migrate.SchemaTooNew as exc:
                log.error("%s", exc)  # a person must act; keep spooling meanwhile
                return
            except Exception:
                continue

    async def _retention_loop(self) -> None:
        while True:
            await asyncio.sleep(RETENTION_INTERVAL_S)
            try:
                await self.purge()
            except Exception as exc:
                log.warning("retention pass failed (%s); next one in an hour", exc)

    async def purge(self, now: float | None = None) -> dict[str, int]:
        """One retention pass (every hour by itself); rows deleted per table."""
        now = time.time() if now is None else now
        done = await retention.purge(self.db, self.ledger_retention_days, now)
        done["responses"] = await self.responses.purge_expired(int(now))
        done["console_sessions"] = await self.sessions.purge_expired(now)
        return done

    @property
    def writers(self) -> dict[str, BatchWriter]:
        """The batching writers by name, for metrics."""
        return {"ledger": self.ledger.writer, "decisions": self.decisions.writer}

    @property
    def outages(self) -> int:
        """Database outages since start (each logged once, however many parts noticed it)."""
        return self._outages.count

    @property
    def healthy(self) -> bool:
        return self.ledger.healthy and self.decisions.writer.healthy

    @property
    def durable(self) -> bool:
        """False while records can be neither written nor spooled (GATEWAY_AUDIT_FAIL_CLOSED: refuse)."""
        return self.ledger.writer.durable and self.decisions.writer.durable

    async def close(self, timeout: float = 5.0) -> None:
        """Idempotent: rows still in memory go to the database, else the spool; then the engine closes."""
        if self.closed:
            return
        self.closed = True
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(self.ledger.close(timeout), self.decisions.close(timeout))
        await self.keys.close()
        await self.db.dispose()

    # -- reads, after this replica's own rows are written (not waited for during an outage) -----------
    # A database that can't be reached raises StoreUnavailable (the API answers 503, never a 500).
    @contextlib.asynccontextmanager
    async def _reachable(self):  # type: ignore[no-untyped-def]
        try:
            yield
        except _DOWN as exc:
            raise StoreUnavailable(f"database {self.db.display_url} unreachable: "
                                   f"{str(getattr(exc, 'orig', None) or exc)[:200]}") from None

    async def _flush_for_read(self) -> None:
        if self.ledger.healthy:
            await self.ledger.flush(READ_FLUSH_TIMEOUT_S)

    async def usage_page(self, width: str, starts: Sequence[int], max_entries: int | None, *,
                         tenants: Iterable[str] = (), key_ids: Iterable[str] = (),
                         models: Iterable[str] = (), group_by: Iterable[str] = ()) -> tuple[dict, int]:
        await self._flush_for_read()
        async with self._reachable():
            return await queries.usage_page(self.db, width, starts, max_entries, tenants=tenants,
                                            key_ids=key_ids, models=models, group_by=group_by)

    async def search_decisions(self, **filters: object):  # type: ignore[no-untyped-def]
        """Decisions.search, after this replica's own decisions are written."""
        if self.decisions.writer.healthy:
            await self.decisions.flush(READ_FLUSH_TIMEOUT_S)
        async with self._reachable():
            return await self.decisions.search(**filters)  # type: ignore[arg-type]

    async def usage_buckets(self, width: str, starts: Sequence[int], *, tenants: Iterable[str] = (),
                            key_ids: Iterable[str] = (), models: Iterable[str] = ()) -> dict:
        await self._flush_for_read()
        return await queries.usage_buckets(self.db, width, starts, tenants=tenants, key_ids=key_ids, models=models)

    async def report(self, since: datetime | None = None, until: datetime | None = None) -> queries.UsageReport:
        await self._flush_for_read()
        return await queries.report(self.db, since, until)

    async def period_usage(self, tenant: str) -> queries.PeriodUsage:
        await self._flush_for_read()
        async with self._reachable():
            return await queries.period_usage(self.db, tenant)

    async def period_usage_all(self) -> dict[str, queries.PeriodUsage]:
        await self._flush_for_read()
        async with self._reachable():
            return await queries.period_usage_all(self.db)
