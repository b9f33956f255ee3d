"""Stored responses: what the bridge keeps of each answered turn, and the protocol every store implements.

The in-memory store (`gateway.responses.memory`) is the default; the SQL one
(`gateway.store.responses.SqlResponseStore`) implements the same protocol for several replicas.
"""

from __future__ import annotations

from typing import Protocol

from gateway.store.responses import StoredResponse

__all__ = ["ResponseStore", "StoredResponse"]


class ResponseStore(Protocol):
    def expect(self) -> object | None:
        """A token for a response being answered that will be saved (pass it to `save`), or None: a store
        that groups its commits waits a little for expected saves (gateway.store.responses)."""

    async def save(self, item: StoredResponse, expires_at: int, expected: object | None = None) -> None:
        """Durable when it returns: a follow-up sent the moment the answer completed finds it."""

    async def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        """None: missing, expired, deleted, or another tenant's (the caller cannot tell which)."""

    async def delete(self, tenant: str, response_id: str) -> bool:
        """The content is gone when it returns; False when there was nothing of this tenant's to delete."""

    async def purge_expired(self, now: int, batch: int = 5000) -> int:
        """Drop the content of responses expired by `now`, at most `batch` of them; how many were dropped."""
