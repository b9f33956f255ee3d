"""The audit trail: one JSON line per policy decision (allow, deny, substitute), and one `"type": "usage"`
line per finished request (gateway/usage/record.py) with the same request id. That id is always the
gateway's own; the client's id for the request, if it sent one, is `client_request_id` beside it.

Lines are written in batches by a background thread (`LineSink`), so a slow disk never blocks the
event loop. Records carry a key id (first 8 hex of the key's hash), never a key.

Reliability, for compliance (an audit record lost without anyone knowing is the worst outcome):
- A failed write (disk full, I/O error) is counted (`write_errors`, exported as
  `gateway_audit_write_errors_total`), logged once per failure streak, and retried with backoff
  (at most 1s apart): records stay in memory and reach the file once it can be written again,
  each exactly once (file writes resume where the failed write stopped).
- `healthy` is False while writes (or a requested reopen) fail, and once records were refused because
  too many are waiting (`GATEWAY_AUDIT_MAX_PENDING`), until the backlog is down to half of it.
  With `GATEWAY_AUDIT_FAIL_CLOSED` the pipeline refuses production/staging requests (503) while the
  trail is not healthy, so no request is served without its record reaching the disk for long.
- The backlog is bounded: when it is full, `record()` refuses the record and returns False. It never
  blocks the event loop (blocking would stall every request on a stalled disk, and a failing disk
  would still not take the record); the refusal is counted (`dropped`, exported as
  `gateway_audit_records_dropped_total`), logged once, and makes the trail unhealthy. A caller that
  must not serve an unaudited request checks the return value (fail closed).
- `reopen()` (SIGHUP, after logrotate moved the file) makes later records go to a new file at the
  configured path; records handed over before it go to the moved file. Nothing is lost either way.
- `close()` (lifespan shutdown, after the drain; also at interpreter exit) writes out every accepted
  record and fsyncs the file, retrying failed writes for at most its timeout; what it must give up is
  counted as dropped and logged.
"""

from __future__ import annotations

import atexit
import logging
from dataclasses import dataclass

import orjson

from gateway.observability.lines import (DEFAULT_CLOSE_TIMEOUT_S, DEFAULT_MAX_PENDING, LineSink,
                                         LineTarget)
from gateway.observability.timestamps import utc_now_iso

log = logging.getLogger("gateway.audit")


@dataclass  # not frozen: a frozen dataclass's __init__ costs ~3x (object.__setattr__ per field)
class AuditRecord:
    request_id: str
    tenant: str
    key_id: str
    model_requested: str
    model_served: str | None
    license: str
    decision: str
    rule: str
    # The client's own id for the request (x-client-request-id), kept beside the gateway's `request_id`,
    # which no client chooses (gateway/api/request_context.py).
    client_request_id: str | None = None
    endpoint: str = "chat"  # chat | completions | responses

    def to_json(self) -> str:
        record = {"time": utc_now_iso(), **self.__dict__}
        return orjson.dumps(record).decode()


class AuditTrail:
    def __init__(self, sink: str | LineTarget, *, max_pending: int = DEFAULT_MAX_PENDING,
                 close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        """`sink`: "stdout", "stderr", a file path (appended), or a `LineTarget` (tests)."""
        options = {"max_pending": max_pending, "retry": True, "log": log}
        self._lines = LineSink.to(sink, **options) if isinstance(sink, str) else LineSink(sink, **options)
        self._close_timeout_s = close_timeout_s
        atexit.register(self.close)  # records of a process that exits without a lifespan shutdown

    def record(self, entry: AuditRecord) -> bool:
        """Queue the record for writing. False: refused (too many records waiting, or closed); counted."""
        return self._lines.write(entry.to_json())

    def record_line(self, line: str) -> bool:
        """Queue one JSON line of another record type (the usage record, `"type": "usage"`)."""
        return self._lines.write(line)

    @property
    def healthy(self) -> bool:
        """False while writes fail, or while records are being refused for a full backlog."""
        return self._lines.healthy

    @property
    def write_errors(self) -> int:
        """Failed write (and reopen) attempts since start; every retry of a failing write counts."""
        return self._lines.write_errors

    @property
    def dropped(self) -> int:
        """Records that will never be written: refused (backlog full, or after close) or given up at close."""
        return self._lines.dropped

    @property
    def pending(self) -> int:
        """Records accepted and not yet written."""
        return self._lines.pending

    def reopen(self) -> None:
        """Reopen the file at its path (logrotate); stdout/stderr: nothing to do. Doesn't block."""
        self._lines.reopen()

    def wait_written(self, timeout: float) -> bool:
        """Block until every record accepted so far is written; False on timeout (writes failing)."""
        return self._lines.wait_written(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Write out every accepted record (retrying failures for at most `timeout`), fsync and close.
        Blocks for up to `timeout` (default: the one given at construction); idempotent."""
        atexit.unregister(self.close)
        self._lines.close(self._close_timeout_s if timeout is None else timeout)
