"""The in-memory response store: one process, lost on restart, bounded.

The default (and the tests') until the SQL store is wired in: a chain continues only on the replica that
answered it, and a restart forgets every stored response. It holds at most `capacity` responses; beyond
that the oldest is dropped, so a busy gateway's memory cannot grow with 30 days of answers.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from gateway.responses.store import StoredResponse

DEFAULT_CAPACITY = 100_000


class MemoryResponseStore:
    def __init__(self, capacity: int = DEFAULT_CAPACITY, clock=time.time) -> None:
        self.capacity = capacity
        self._clock = clock
        # id -> (response, expires_at), oldest first: an insertion-ordered dict is the eviction queue.
        self._items: OrderedDict[str, tuple[StoredResponse, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    async def save(self, item: StoredResponse, expires_at: int) -> None:
        self._items[item.id] = (item, expires_at)
        self._items.move_to_end(item.id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    async def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        found = self._items.get(response_id)
        if found is None or found[0].tenant != tenant:
            return None
        item, expires_at = found
        if expires_at <= self._clock():
            del self._items[response_id]
            return None
        return item

    async def delete(self, tenant: str, response_id: str) -> bool:
        if await self.get(tenant, response_id) is None:
            return False
        del self._items[response_id]
        return True

    async def purge_expired(self, now: int, batch: int = 5000) -> int:
        expired = [key for key, (_, expires_at) in self._items.items() if expires_at <= now][:batch]
        for key in expired:
            del self._items[key]
        return len(expired)
