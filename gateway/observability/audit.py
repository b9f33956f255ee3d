"""The audit trail: one JSON line per policy decision (allow, deny, substitute).

Writes go through a queue to a background thread (stdlib QueueHandler/QueueListener), so a slow disk
never blocks the event loop. Records carry a key id (first 8 hex of the key's hash), never a key.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys
from dataclasses import dataclass
from datetime import datetime, timezone

import orjson


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
        self._logger = logging.getLogger(f"gateway.audit.{id(self)}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        target: logging.Handler
        if sink == "stdout":
            target = logging.StreamHandler(sys.stdout)
        else:
            target = logging.FileHandler(sink, encoding="utf-8")
        target.setFormatter(logging.Formatter("%(message)s"))
        records: queue.SimpleQueue = queue.SimpleQueue()
        self._logger.addHandler(logging.handlers.QueueHandler(records))
        self._listener = logging.handlers.QueueListener(records, target)
        self._listener.start()
        self._target = target

    def record(self, entry: AuditRecord) -> None:
        self._logger.info(entry.to_json())

    def close(self) -> None:
        self._listener.stop()
        self._target.close()
