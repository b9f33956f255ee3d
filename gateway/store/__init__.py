"""The database store: usage ledger and rollups, API keys, policy decisions, stored responses, console
sessions (SQLAlchemy Core, async; PostgreSQL or SQLite; Alembic migrations shipped inside). Below the pipeline: it imports
nothing of the gateway but settings and errors. Start with `gateway.store.store.Store`.

Names are imported lazily (`from gateway.store import Store`), so that `gateway db ...` and the other
commands don't pay for SQLAlchemy unless they use it.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "Store": "store", "Database": "database", "LedgerRow": "ledger", "DecisionRow": "decisions",
    "KeyRecord": "keys", "NewKey": "keys", "StoredResponse": "responses", "SqlResponseStore": "responses",
    "ResponseStore": "responses", "StoreUnavailable": "responses", "SchemaTooNew": "migrate",
    "DatabaseUrlError": "url", "UsageReport": "queries", "PeriodUsage": "queries",
    "SessionStore": "sessions", "Session": "sessions",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway.store' has no attribute {name!r}")
    return getattr(importlib.import_module(f"gateway.store.{module}"), name)
