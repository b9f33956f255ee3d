"""Log lines written from the event loop in batches by one thread: the loop never blocks on a slow
disk or pipe, and pays one list append per line.

The stdlib's QueueHandler/QueueListener does the same one record at a time: a queue hand-off, a thread
wake-up and a write per line, ~10% of the request path's CPU under load here (audit + access log).

Reliability (the audit trail depends on it):
- Lines accepted but not yet written are capped (`max_pending`). A full sink refuses the line:
  `write()` returns False and the refusal is counted in `dropped`; it never blocks the event loop.
- A failed write is counted (`write_errors`) and, with `retry=True`, the batch is kept and retried
  (backoff up to `RETRY_MAX_S`) until it succeeds, so a disk that fills up and frees again loses nothing
  that was accepted. File targets write with `os.write`, so a retry resumes exactly where the failed
  write stopped: no duplicated and no torn lines. With `retry=False` (plain logs) the batch is counted
  as dropped instead.
- `reopen()` reopens a file target's path (logrotate); `wait_written()` waits until everything accepted
  so far is written; `close()` writes out everything accepted, retrying failures for at most its timeout.
- `healthy` is False while writes fail, while a requested reopen fails, and once lines were refused
  for a full queue (until the backlog is down to half the cap).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import queue
import sys
import threading
import time
from typing import Protocol, TextIO

FLUSH_INTERVAL_S = 0.05
RETRY_MIN_S = 0.05
RETRY_MAX_S = 1.0
DEFAULT_MAX_PENDING = 100_000
DEFAULT_CLOSE_TIMEOUT_S = 5.0

_STOP = object()
_REOPEN = object()


class LineTarget(Protocol):
    """Where a sink's batches go. Called from the writer thread only."""

    description: str

    def write(self, batch: str, *, retry: bool) -> None:
        """Write the whole batch or raise OSError/ValueError. `retry`: the same batch again after a failure
        (resume it; don't write twice what already went out, where the target can know)."""

    def reopen(self) -> None:
        """Start writing to a freshly opened target (a file's path again, after logrotate moved it)."""

    def close(self) -> None: ...


class FileTarget:
    """A file opened O_APPEND and written with `os.write`: a short or failed write says exactly how much
    reached the file, so a retried batch continues from there."""

    def __init__(self, path: str) -> None:
        self.description = path
        self._path = path
        self._fd = self._open()
        self._data = b""
        self._done = 0

    def _open(self) -> int:
        return os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)

    def write(self, batch: str, *, retry: bool) -> None:
        if not retry:
            self._data, self._done = batch.encode("utf-8", "backslashreplace"), 0
        view = memoryview(self._data)
        while self._done < len(self._data):
            written = os.write(self._fd, view[self._done:])
            if written <= 0:
                raise OSError(f"wrote nothing to {self._path}")
            self._done += written
        self._data, self._done = b"", 0

    def reopen(self) -> None:
        fd = self._open()  # if this fails, the old file stays in use
        old, self._fd = self._fd, fd
        with contextlib.suppress(OSError):
            os.close(old)
        # A line cut short by a failed write in the old file is written whole to the new one.
        self._done = self._data.rfind(b"\n", 0, self._done) + 1 if self._done else 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.fsync(self._fd)
        with contextlib.suppress(OSError):
            os.close(self._fd)


class StreamTarget:
    """A text stream (stdout, stderr). After a failed flush the stream still holds the batch, so a retry
    only flushes; after a failed `write` the batch is written again (it may then appear twice)."""

    def __init__(self, stream: TextIO, *, owns_stream: bool = False) -> None:
        self.description = getattr(stream, "name", None) or repr(stream)
        self._stream = stream
        self._owns_stream = owns_stream
        self._buffered = False

    def write(self, batch: str, *, retry: bool) -> None:
        if not (retry and self._buffered):
            self._buffered = False
            self._stream.write(batch)
            self._buffered = True
        self._stream.flush()
        self._buffered = False

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()
        if self._owns_stream:
            with contextlib.suppress(OSError, ValueError):
                self._stream.close()


class LineSink:
    def __init__(self, stream: TextIO | LineTarget, *, owns_stream: bool = False,
                 max_pending: int = DEFAULT_MAX_PENDING, retry: bool = False,
                 log: logging.Logger | None = None) -> None:
        """`stream`: a text stream, or a `LineTarget`. `retry`: keep a failed batch and retry it (else count
        it as dropped). `log`: where failures are reported, once per streak (None: counters only; a log
        sink must not log its own failures)."""
        self._target: LineTarget = (stream if hasattr(stream, "reopen")
                                    else StreamTarget(stream, owns_stream=owns_stream))
        self._max_pending = max(1, max_pending)
        self._retry = retry
        self._log = log
        self._pending: list[str] = []
        self._lock = threading.Lock()  # lines may come from worker threads too (asyncio.to_thread)
        self._flush_scheduled = False
        self._batches: queue.SimpleQueue = queue.SimpleQueue()
        # Guarded by _lock: lines accepted and not yet written (or given up), and the refusals.
        self._backlog = 0
        self._closed = False
        self._saturated = False
        self.dropped = 0
        # Writer thread only (read anywhere): failed write/reopen attempts, current failure state.
        self.write_errors = 0
        self._failing = False
        self._failures_in_streak = 0
        self._reopen_failed = False
        self._reopen_requested = False
        self._wake = threading.Event()
        self._deadline: float | None = None
        self._lost_at_close = 0
        self._writer = threading.Thread(target=self._write_batches, name="line-sink", daemon=True)
        self._writer.start()

    @classmethod
    def to(cls, target: str, **kwargs) -> "LineSink":
        """"stdout", "stderr", or a file path (appended, UTF-8)."""
        if target in ("stdout", "stderr"):
            return cls(getattr(sys, target), **kwargs)
        return cls(FileTarget(target), **kwargs)

    @property
    def healthy(self) -> bool:
        return not (self._failing or self._reopen_failed or self._saturated)

    @property
    def pending(self) -> int:
        """Lines accepted and not yet written."""
        return self._backlog

    def write(self, line: str) -> bool:
        """Queue one line; False when it was refused (sink full or closed), which is counted in `dropped`."""
        with self._lock:
            accepted = not self._closed and self._backlog < self._max_pending
            if accepted:
                self._pending.append(line)
                self._backlog += 1
            else:
                self.dropped += 1
                first_refusal = not self._closed and not self._saturated
                self._saturated = self._saturated or not self._closed
        if not accepted:
            if first_refusal and self._log:
                self._log.error("%s: %d lines waiting to be written (the cap); refusing new lines until the "
                                "backlog is down to half", self._target.description, self._max_pending)
            return False
        if not self._flush_scheduled:
            try:
                asyncio.get_running_loop().call_later(FLUSH_INTERVAL_S, self.flush)
                self._flush_scheduled = True
            except RuntimeError:  # no loop (start-up, shutdown, tools): hand it over now
                self.flush()
        return True

    def flush(self) -> None:
        """Hand the lines queued so far to the writer thread (it writes them soon; see `wait_written`)."""
        self._flush_scheduled = False
        with self._lock:
            lines, self._pending = self._pending, []
        if lines:
            self._batches.put(("\n".join(lines) + "\n", len(lines)))

    def reopen(self) -> None:
        """Reopen the target (a file's path, e.g. after logrotate moved it): lines handed over before go to
        the old file, later ones to the new. Done by the writer thread; a failure keeps the old file, is
        counted and logged, and the reopen is tried again before each later write."""
        self.flush()
        self._reopen_requested = True
        self._batches.put(_REOPEN)
        self._wake.set()  # a writer waiting to retry a failed write reopens first

    def wait_written(self, timeout: float) -> bool:
        """Wait until every line accepted so far is written; False if that took longer than `timeout`."""
        if self._closed:
            return self._backlog == 0
        self.flush()
        done = threading.Event()
        self._batches.put(done)
        return done.wait(timeout)

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        """Write out every line accepted (failed writes are retried for at most `timeout`), then close."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.flush()
        self._deadline = time.monotonic() + timeout
        self._batches.put(_STOP)
        self._wake.set()
        self._writer.join(timeout + 1.0)
        if self._writer.is_alive() and self._log:
            self._log.error("%s: writer still stuck after %.1fs at close; %d lines may be lost",
                            self._target.description, timeout, self._backlog)

    # The writer thread.

    def _write_batches(self) -> None:
        while (item := self._batches.get()) is not _STOP:
            if item is _REOPEN:
                if self._reopen_requested:
                    self._reopen()
            elif isinstance(item, threading.Event):
                item.set()
            else:
                self._write(*item)
        self._target.close()
        if self._lost_at_close and self._log:
            self._log.error("%s: gave up on %d lines at close (writes still failing)", self._target.description,
                            self._lost_at_close)

    def _write(self, batch: str, lines: int) -> None:
        delay = RETRY_MIN_S
        retry = False
        while True:
            # A reopen waits for its turn in the queue, unless this write is failing or the last try failed.
            if self._reopen_requested and (retry or self._reopen_failed):
                self._reopen()
            try:
                self._target.write(batch, retry=retry)
            except OSError as exc:
                self._failed(exc)
                if not self._retry or self._past_deadline():
                    self._give_up(lines)
                    return
                self._wake.wait(self._wait_s(delay))
                self._wake.clear()
                delay = min(delay * 2, RETRY_MAX_S)
                retry = True
                continue
            except ValueError as exc:  # a closed stream, text it can't encode: retrying won't help
                self._failed(exc)
                self._give_up(lines)
                return
            self._written(lines)
            return

    def _wait_s(self, delay: float) -> float:
        if self._deadline is None:
            return delay
        return max(0.0, min(delay, self._deadline - time.monotonic()))

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _failed(self, exc: Exception) -> None:
        self.write_errors += 1
        self._failures_in_streak += 1
        if not self._failing:
            self._failing = True
            if self._log:
                self._log.error("%s: write failed (%s); %s", self._target.description, exc,
                                "keeping the lines and retrying" if self._retry else "lines lost")

    def _written(self, lines: int) -> None:
        self._settle(lines, lost=False)
        if self._failing:
            self._failing = False
            if self._log:
                self._log.warning("%s: writing again after %d failed attempts", self._target.description,
                                  self._failures_in_streak)
        self._failures_in_streak = 0

    def _give_up(self, lines: int) -> None:
        self._settle(lines, lost=True)
        if self._past_deadline():
            self._lost_at_close += lines  # logged once, when the writer ends

    def _settle(self, lines: int, *, lost: bool) -> None:
        with self._lock:
            self._backlog -= lines
            if lost:
                self.dropped += lines
            room_again = self._saturated and self._backlog <= self._max_pending // 2
            if room_again:
                self._saturated = False
        if room_again and self._log:
            self._log.warning("%s: accepting lines again; %d refused or lost so far", self._target.description,
                              self.dropped)

    def _reopen(self) -> None:
        self._reopen_requested = False
        try:
            self._target.reopen()
        except OSError as exc:
            self._reopen_requested = True  # again before the next write
            self.write_errors += 1
            if not self._reopen_failed:
                self._reopen_failed = True
                if self._log:
                    self._log.error("%s: reopen failed (%s); still writing to the file open before",
                                    self._target.description, exc)
            return
        if self._reopen_failed:
            self._reopen_failed = False
            if self._log:
                self._log.warning("%s: reopened", self._target.description)


class SecondCachedFormatter(logging.Formatter):
    """logging.Formatter, with `asctime` formatted once per second (time.localtime + strftime per line
    was a quarter of the cost of an access-log line). Same text as the default formatter."""

    def __init__(self, fmt: str | None = None) -> None:
        super().__init__(fmt)
        self._second = -1
        self._text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second, self._text = second, time.strftime(self.default_time_format, self.converter(second))
        return self.default_msec_format % (self._text, record.msecs)


class LineSinkHandler(logging.Handler):
    """A logging handler that formats on the caller's thread and writes through a `LineSink`."""

    def __init__(self, sink: LineSink) -> None:
        super().__init__()
        self.sink = sink
        atexit.register(sink.close)  # the last lines (e.g. why start-up failed) must not be lost

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.write(self.format(record))
        except Exception:  # noqa: BLE001 (logging's own contract: never raise from emit)
            self.handleError(record)
