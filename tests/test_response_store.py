"""The contract every response store keeps (gateway/responses/store.py), run on each implementation.

`STORES` names the implementations: the in-memory one here; the SQL one (gateway.store.responses) joins the
list when it is wired in, and must pass the same tests. Plus what only the memory store promises: a bound.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from gateway.responses.memory import MemoryResponseStore
from gateway.responses.retention import purge_periodically
from gateway.responses.store import ResponseStore, StoredResponse

STORES: dict[str, Callable[[], ResponseStore]] = {"memory": MemoryResponseStore}


def _item(response_id: str, tenant: str = "team-a", previous: str | None = None, created: int | None = None) -> StoredResponse:
    created = int(time.time()) if created is None else created
    return StoredResponse(response_id, tenant, created, previous,
                          {"id": response_id, "object": "response", "status": "completed", "output": []},
                          [{"id": f"msg_{response_id}", "type": "message", "role": "user", "status": "completed",
                            "content": [{"type": "input_text", "text": "hi"}]}])


@pytest.fixture(params=list(STORES))
def store(request: pytest.FixtureRequest) -> ResponseStore:
    return STORES[request.param]()


def test_saved_is_found_by_its_tenant_only(store: ResponseStore) -> None:
    async def run() -> None:
        saved = _item("resp_1", previous="resp_0")
        await store.save(saved, int(time.time()) + 60)
        assert await store.get("team-a", "resp_1") == saved
        assert await store.get("team-b", "resp_1") is None  # never tells another tenant it exists
        assert await store.get("team-a", "resp_2") is None
        assert not await store.delete("team-b", "resp_1")
        assert await store.get("team-a", "resp_1") == saved

    asyncio.run(run())


def test_deleted_and_expired_lose_their_content(store: ResponseStore) -> None:
    async def run() -> None:
        now = int(time.time())
        await store.save(_item("resp_gone"), now + 60)
        await store.save(_item("resp_old"), now - 1)
        await store.save(_item("resp_new"), now + 60)
        assert await store.delete("team-a", "resp_gone")
        assert await store.get("team-a", "resp_gone") is None and not await store.delete("team-a", "resp_gone")
        assert await store.get("team-a", "resp_old") is None  # expired reads as missing before any purge
        assert await store.get("team-a", "resp_new") is not None

    asyncio.run(run())


def test_purge_runs_in_batches(store: ResponseStore) -> None:
    async def run() -> None:
        now = int(time.time())
        for n in range(7):
            await store.save(_item(f"resp_{n}"), now - 10)
        await store.save(_item("resp_kept"), now + 60)
        assert await store.purge_expired(now, batch=5) == 5
        assert await store.purge_expired(now, batch=5) == 2
        assert await store.purge_expired(now, batch=5) == 0
        assert await store.get("team-a", "resp_kept") is not None

    asyncio.run(run())


def test_the_background_purge_drains_every_batch() -> None:
    store = MemoryResponseStore()

    async def run() -> None:
        now = int(time.time())
        for n in range(12):
            await store.save(_item(f"resp_{n}"), now - 10)
        await store.save(_item("resp_kept"), now + 60)
        task = asyncio.create_task(purge_periodically(store, 0.01, batch=5))
        for _ in range(200):
            if len(store) == 1:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        assert len(store) == 1 and await store.get("team-a", "resp_kept") is not None

    asyncio.run(run())


def test_the_memory_store_is_bounded() -> None:
    store = MemoryResponseStore(capacity=3)

    async def run() -> None:
        for n in range(5):
            await store.save(_item(f"resp_{n}"), int(time.time()) + 60)
        assert len(store) == 3
        assert [await store.get("team-a", f"resp_{n}") is not None for n in range(5)] == [False, False, True, True, True]

    asyncio.run(run())
