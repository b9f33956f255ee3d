"""The audit trail: one JSON line per policy decision (allow, deny, substitute).

Lines are written in batches by a background thread (`LineSink`), so a slow disk never blocks the
event loop. Records carry a key id (first 8 hex of the key's hash), never a key.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import orjson

from gateway.observability.lines import LineSink


@dataclass(frozen=True)
class AuditRecord:
    request_id: str
    tenant: str
    key_id: str
    model_requested: str
    model_served: str | None
    license: str
    decision: str
    rule: str

    def to_json(self) -> str:
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **self.__dict__}
        return orjson.dumps(record).decode()


class AuditTrail:
    def __init__(self, sink: str) -> None:
        self._lines = LineSink.to(sink)

    def record(self, entry: AuditRecord) -> None:
        self._lines.write(entry.to_json())

    def close(self) -> None:
        self._lines.close()
