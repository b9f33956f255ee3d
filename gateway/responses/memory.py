"""The in-memory response store: one process, lost on restart, bounded.

The default (and the tests') until the SQL store is wired in: a chain continues only on the replica that
answered it, and a restart forgets every stored response. It holds at most `capacity` responses; beyond
that the oldest is dropped, so a busy gateway's memory cannot grow with 30 days of answers.

Each response is kept as one JSON blob, not as the dicts it arrived as: bytes are invisible to the garbage
collector, which otherwise scanned every stored object at each young collection (~25 µs per request at
c64 once thousands were stored), and they take a fifth of the memory (~1.5 KB for a short answer).
"""

from __future__ import annotations

import time
from collections import OrderedDict

import orjson

from gateway.responses.store import StoredResponse

DEFAULT_CAPACITY = 10_000

# tenant, created_at, previous_response_id, JSON of (response, input_items), expires_at
_Entry = tuple[str, int, "str | None", bytes, int]


class MemoryResponseStore:
    def __init__(self, capacity: int = DEFAULT_CAPACITY, clock=time.time) -> None:
        self.capacity = capacity
        self._clock = clock
        # id -> entry, oldest first: an insertion-ordered dict is the eviction queue.
        self._items: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def expect(self) -> None:  # nothing to group: a save here is a dict insert
        return None

    async def save(self, item: StoredResponse, expires_at: int, expected: object | None = None) -> None:
        # Copied to its own size: orjson's result keeps its whole working buffer (16 KiB for a 1.3 KB answer).
        blob = bytes(memoryview(orjson.dumps((item.response, item.input_items))))
        self._items[item.id] = (item.tenant, item.created_at, item.previous_response_id, blob, expires_at)
        self._items.move_to_end(item.id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    async def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        found = self._items.get(response_id)
        if found is None or found[0] != tenant:
            return None
        owner, created_at, previous, blob, expires_at = found
        if expires_at <= self._clock():
            del self._items[response_id]
            return None
        response, input_items = orjson.loads(blob)
        return StoredResponse(response_id, owner, created_at, previous, response, input_items)

    async def delete(self, tenant: str, response_id: str) -> bool:
        if await self.get(tenant, response_id) is None:
            return False
        del self._items[response_id]
        return True

    async def purge_expired(self, now: int, batch: int = 5000) -> int:
        expired = [key for key, entry in self._items.items() if entry[4] <= now][:batch]
        for key in expired:
            del self._items[key]
        return len(expired)
