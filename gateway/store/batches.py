"""The batching writer shared by the usage ledger and the policy decisions: rows are appended to a list on
the request path (`record`, no I/O), and made durable off it.

Every `interval_s` the rows recorded since the last tick become one batch: encoded, written to the
local spool (append + fsync, in a thread), then written to the database in one transaction by a single
drain task, and the spool file removed. Writing the spool first, whatever the database's state, is what
bounds a `kill -9`: it loses only the rows recorded since the last tick's spool write completed (at most
one interval plus one fsync). A batch whose commit succeeded but whose acknowledgement was lost stays in
the spool and is written again: the table writers are idempotent on the row ids assigned at encoding.

While the database is unreachable, batches pile up in the spool (bounded by `max_spool_bytes`) and the
drain task retries the oldest with backoff; one log line and one `on_outage(True)` call when an outage
starts, one of each when it ends. A batch the database refuses for its content (a data or integrity
error, not a connection one) is moved to `spool/<name>/rejected/` and logged, so it cannot block the
others. When the spool itself can't be written (disk full, read-only), batches wait in memory for the
database instead; when both fail, `durable` is False (fail closed) and rows beyond `max_memory_rows`
are dropped and counted.

`close()` (SIGTERM, after the drain) spools what is left and writes the spool to the database for at
most its timeout; what remains stays in the spool for the next start: nothing acknowledged is lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import orjson
from sqlalchemy import exc as sa_exc

from gateway.store.spool import Spool, SpoolFull

log = logging.getLogger("gateway.store")

T = TypeVar("T")
# A batch as encoded at the tick: {"dims": [[...strings...], ...], "rows": [[..., dim index, ...], ...]}.
# Each writer decides its rows' fields; the repeated strings travel once per batch in "dims".
Encoded = dict[str, Any]
WRITE_TIMEOUT_S = 30.0
MAX_BACKOFF_S = 5.0


@dataclass
class _Batch:
    batch: Encoded | None  # None: on disk only (replayed, or spooled during an outage), read in its turn
    payload: bytes | None  # the batch as JSON, as spooled: the table writers hand it to the database
    path: Path | None  # None: the spool could not be written; in memory only
    count: int


def is_content_error(error: BaseException) -> bool:
    """The database refused these rows for what they are (retrying won't help), not for being down:
    SQLAlchemy's DataError/IntegrityError, or asyncpg's own (statements sent on the raw connection) by
    their SQLSTATE class, 22 (data exception) and 23 (integrity constraint violation)."""
    if isinstance(error, (sa_exc.DataError, sa_exc.IntegrityError)):
        return True
    state = getattr(error, "sqlstate", None)
    return isinstance(state, str) and state[:2] in ("22", "23")


class BatchWriter(Generic[T]):
    def __init__(self, name: str, spool_dir: Path, encode: Callable[[list[T]], Encoded],
                 write: Callable[[Encoded, bytes], Awaitable[None]], *, interval_s: float = 1.0,
                 max_spool_bytes: int = 1 << 30, max_memory_rows: int = 1_000_000,
                 on_outage: Callable[[bool], None] | None = None, log_outages: bool = True) -> None:
        """`on_outage(down)`: called when a database outage starts and ends; `log_outages`: log those two
        moments here (off where the caller logs one line for several writers)."""
        self.name = name
        self.interval_s = interval_s
        self.max_memory_rows = max_memory_rows
        self._encode, self._write = encode, write
        self._spool = Spool(spool_dir, max_spool_bytes)
        self._on_outage = on_outage
        self._log_outages = log_outages
        self.last_error = ""  # why the database was last found unwritable
        self._buffer: list[T] = []
        self._queue: collections.deque[_Batch] = collections.deque()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._tick_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self._db_down = False
        self._spool_failing = False
        # Counters for metrics (they only grow; `waiting_rows` and `spool_bytes` are the gauges).
        self.written_rows = 0
        self.spooled_rows = 0  # rows that went to the spool because the database was not writable
        self.dropped_rows = 0
        self.rejected_rows = 0
        self.outages = 0
        self.write_errors = 0

    # -- the request path ---------------------------------------------------------------------------
    def record(self, item: T) -> None:
        """Append one row; microseconds, no I/O. Made durable at the next tick."""
        self._buffer.append(item)

    def mark_down(self, reason: str = "") -> None:
        """The database is known to be unreachable (at start): unhealthy now, one outage, as a failed
        write would make it; the first write that succeeds ends it."""
        if not self._db_down:
            self._db_down = True
            self.last_error = reason
            self.outages += 1
            if self._on_outage:
                self._on_outage(True)

    def mark_up_if_idle(self) -> None:
        """The database answers again (the store reached it): a writer with nothing waiting has no write
        to prove it, so its outage ends here; one with batches waiting ends it with their first write."""
        if self._db_down and not self._queue and not self._buffer:
            self._db_down = False
            if self._on_outage:
                self._on_outage(False)

    # -- state for health and metrics ---------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """False during a database outage or while the spool can't be written."""
        return not (self._db_down or self._spool_failing)

    @property
    def durable(self) -> bool:
        """False when rows can be neither written to the database nor spooled: fail closed on this."""
        return not (self._db_down and self._spool_failing)

    @property
    def waiting_rows(self) -> int:
        """Rows recorded and not yet in the database (memory, spool)."""
        return len(self._buffer) + sum(batch.count for batch in self._queue)

    @property
    def spool_directory(self) -> Path:
        return self._spool.directory

    @property
    def spool_bytes(self) -> int:
        return self._spool.bytes

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Queue the batches an earlier process left in the spool, then start ticking and draining."""
        try:
            leftovers = await asyncio.to_thread(self._spool.pending)
        except OSError as exc:
            log.warning("%s spool %s unreadable (%s); earlier batches are not replayed",
                        self.name, self._spool.directory, exc)
            leftovers = []
        for path in leftovers:
            self._queue.append(_Batch(None, None, path, 0))
        if leftovers:
            self._drained.clear()
            log.info("%s: replaying %d spooled batches from %s", self.name, len(leftovers), self._spool.directory)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._tick_loop()), loop.create_task(self._drain_loop())]
        self._wake.set()

    async def flush(self, timeout: float = 5.0) -> bool:
        """Tick now and wait until everything recorded so far is in the database; False on timeout."""
        await self._tick()
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self, timeout: float = 5.0) -> None:
        """Spool what is left, write the spool to the database for at most `timeout`, stop."""
        if self._closed:
            return
        self._closed = True
        tick, drain = self._tasks or (None, None)
        if tick is not None:
            tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tick
        await self._tick()
        if drain is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout)
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
        lost = sum(batch.count for batch in self._queue if batch.path is None)
        if lost:
            self.dropped_rows += lost
            log.error("%s: %d rows lost at shutdown: neither the database nor the spool %s could be written",
                      self.name, lost, self._spool.directory)
        left = sum(1 for batch in self._queue if batch.path is not None)
        if left:
            log.warning("%s: %d batches stay in the spool %s for the next start", self.name, left,
                        self._spool.directory)

    # -- ticking: memory -> spool -------------------------------------------------------------------
    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self._tick()
            except Exception:  # never let the loop die: the next tick retries
                log.exception("%s: tick failed", self.name)

    async def _tick(self) -> None:
        async with self._tick_lock:
            if not self._buffer:
                return
            items, self._buffer = self._buffer, []
            batch = self._encode(items)
            payload = orjson.dumps(batch)
            count = len(batch["rows"])
            try:
                path: Path | None = await asyncio.to_thread(self._spool.write, payload)
                if self._spool_failing:
                    self._spool_failing = False
                    log.warning("%s: spool %s writable again", self.name, self._spool.directory)
            except (OSError, SpoolFull) as exc:
                path = None
                if not self._spool_failing:
                    self._spool_failing = True
                    log.error("%s: spool %s not writable (%s); rows wait in memory for the database",
                              self.name, self._spool.directory, exc)
                in_memory = sum(queued.count for queued in self._queue if queued.path is None)
                if in_memory + count > self.max_memory_rows:
                    self.dropped_rows += count
                    log.error("%s: %d rows dropped: %d already wait in memory", self.name, count, in_memory)
                    return
            if self._db_down and path is not None:
                # A long outage must not fill memory: this one is read back from the spool in its turn.
                self._queue.append(_Batch(None, None, path, count))
            else:
                self._queue.append(_Batch(batch, payload, path, count))
            if self._db_down:
                self.spooled_rows += count
            self._drained.clear()
            self._wake.set()

    # -- draining: spool -> database ----------------------------------------------------------------
    async def _drain_loop(self) -> None:
        backoff = 0.25
        while True:
            if not self._queue:
                self._drained.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._queue[0]
            try:
                if batch.batch is None:
                    await self._load(batch)
                if batch.batch is not None and batch.payload is not None and batch.count:
                    await asyncio.wait_for(self._write(batch.batch, batch.payload), WRITE_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.write_errors += 1
                if is_content_error(exc):
                    await self._reject(batch, exc)
                    continue
                self._outage(exc)
                await asyncio.sleep(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
                continue
            backoff = 0.25
            self._queue.popleft()
            self.written_rows += batch.count if batch.batch is not None else 0
            if batch.path is not None:
                await asyncio.to_thread(self._spool.remove, batch.path)
            if self._db_down:
                self._db_down = False
                if self._log_outages:
                    log.warning("%s: database writable again; %d rows wait in the spool", self.name,
                                self.waiting_rows)
                if self._on_outage:
                    self._on_outage(False)

    async def _load(self, batch: _Batch) -> None:
        """Read a spooled batch back; a file another process already replayed leaves it empty."""
        assert batch.path is not None
        payload = await asyncio.to_thread(self._spool.read, batch.path)
        if payload is None:
            return
        try:
            decoded = orjson.loads(payload)
            count = len(decoded["rows"])
        except (orjson.JSONDecodeError, KeyError, TypeError):  # only complete files get the final name
            log.error("%s: spooled batch %s is not readable; moved aside", self.name, batch.path)
            await asyncio.to_thread(self._spool.reject, batch.path)
            return
        batch.batch, batch.payload, batch.count = decoded, payload, count

    async def _reject(self, batch: _Batch, error: BaseException) -> None:
        self._queue.popleft()
        self.rejected_rows += batch.count
        target = "nowhere (it was in memory only)"
        if batch.path is not None:
            target = str(await asyncio.to_thread(self._spool.reject, batch.path))
        log.error("%s: the database refused a batch of %d rows (%s); moved to %s", self.name, batch.count,
                  _short(error), target)

    def _outage(self, error: BaseException) -> None:
        if self._db_down:
            return
        self._db_down = True
        self.outages += 1
        self.last_error = _short(error)
        if self._log_outages:
            log.error("%s: database not writable (%s); batches wait in the spool %s", self.name, self.last_error,
                      self._spool.directory)
        if self._on_outage:
            self._on_outage(True)


def _short(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error) or type(error).__name__
    return text.splitlines()[0][:300]

