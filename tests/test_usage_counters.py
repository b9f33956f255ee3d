"""Usage counter batches against a real redis-server, through a proxy that loses requests or replies on
purpose: a flush cancelled (every shutdown cancels the flush loop) loses nothing, and a batch whose reply
was lost after Redis applied it is not counted twice when it is sent again. And the usage API's page
bound on the in-process counters."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_client

from gateway.usage.counters import WIDTHS, UsageCounters
from tests.support.processes import start_redis
from tests.support.tcp_proxy import LossyProxy

KEY = ("team-a", "k1", "llama-2-7b-chat", "llama2")
NOW = time.time()


@pytest.fixture
def redis_port(log_dir: Path) -> Iterator[int]:
    server, _ = start_redis("counters-redis", log_dir)
    yield int(server.url.rsplit(":", 1)[1])
    server.stop()


def _stored(port: int) -> dict[str, list[int]]:
    """[input, output, requests] of KEY per width, as Redis holds them (read directly, not via the proxy)."""
    store = redis_client.Redis(port=port)
    out = {}
    for width, size in WIDTHS.items():
        fields = store.hgetall(f"gw:use:{width}:{int(NOW // size) * size}")
        field = '["team-a","k1","llama-2-7b-chat","llama2"]'
        out[width] = [int(fields.get(f"{kind}|{field}".encode(), 0)) for kind in "ion"]
    return out


def _once(inp: int, out: int, n: int) -> dict[str, list[int]]:
    return {width: [inp, out, n] for width in WIDTHS}


async def _warmed(proxy: LossyProxy, **options: float) -> UsageCounters:
    """Counters that flushed once already (another tenant's row), as in a running gateway: connected, and
    their script loaded in Redis (a dropped reply is the flush's own, not a NOSCRIPT's)."""
    counters = UsageCounters(f"redis://127.0.0.1:{await proxy.start()}/0", **options)
    counters.add(NOW, "warm-up", "k0", "m", "apache-2.0", 1, 1)
    await counters.flush()
    return counters


async def _until_stored(port: int, expected: dict[str, list[int]]) -> None:
    deadline = time.monotonic() + 5
    while _stored(port) != expected:
        assert time.monotonic() < deadline, _stored(port)
        await asyncio.sleep(0.02)


def test_a_flush_cancelled_before_redis_got_the_batch_sends_it_at_close(redis_port: int) -> None:
    async def run() -> None:
        proxy = LossyProxy(redis_port)
        counters = await _warmed(proxy, flush_interval_s=0.05)
        proxy.hold_requests = True  # Redis stalls: the loop's flush waits for an answer
        counters.add(NOW, *KEY, 5, 7)
        await asyncio.wait_for(proxy.held.wait(), 5)
        proxy.hold_requests = False
        await counters.close()  # the shutdown: cancels the loop in the middle of its flush, then flushes
        await proxy.close()

    asyncio.run(run())
    assert _stored(redis_port) == _once(5, 7, 1)


def test_a_flush_cancelled_after_redis_applied_the_batch_is_not_counted_twice(redis_port: int) -> None:
    async def run() -> None:
        proxy = LossyProxy(redis_port)
        counters = await _warmed(proxy, flush_interval_s=0.05)
        proxy.drop_replies_to = b"gw:use:1m:"  # the flush of the counters
        counters.add(NOW, *KEY, 5, 7)
        await asyncio.wait_for(proxy.forwarded.wait(), 5)
        await _until_stored(redis_port, _once(5, 7, 1))  # applied; its reply never comes
        proxy.drop_replies_to = None
        await counters.close()  # cancels that flush, then sends the same batch again
        await proxy.close()

    asyncio.run(run())
    assert _stored(redis_port) == _once(5, 7, 1)


def test_a_flush_that_timed_out_after_redis_applied_it_is_not_applied_again(redis_port: int) -> None:
    async def run() -> None:
        proxy = LossyProxy(redis_port)
        counters = await _warmed(proxy, flush_interval_s=3600)
        proxy.drop_replies_to = b"gw:use:1m:"  # the flush of the counters
        counters.add(NOW, *KEY, 5, 7)
        await counters.flush()  # Redis applies it; the reply is lost and the flush times out
        assert _stored(redis_port) == _once(5, 7, 1)
        proxy.drop_replies_to = None
        await counters.flush()  # the same batch again: recognised, not added twice
        assert _stored(redis_port) == _once(5, 7, 1)
        counters.add(NOW, *KEY, 1, 2)  # and later batches still count
        await counters.flush()
        assert _stored(redis_port) == _once(6, 9, 2)
        await counters.close()
        await proxy.close()

    asyncio.run(run())
    assert _stored(redis_port) == _once(6, 9, 2)


def test_a_batch_waits_while_redis_is_down_and_arrives_once(redis_port: int, log_dir: Path) -> None:
    async def run() -> None:
        proxy = LossyProxy(redis_port)
        counters = await _warmed(proxy, flush_interval_s=3600, timeout_s=0.3)
        proxy.hold_requests = True
        counters.add(NOW, *KEY, 5, 7)
        await counters.flush()  # never reaches Redis: kept
        counters.add(NOW, *KEY, 1, 1)  # counted meanwhile: a newer batch, sent after the first
        await counters.flush()
        assert _stored(redis_port) == _once(0, 0, 0)
        proxy.hold_requests = False
        await counters.close()
        await proxy.close()

    asyncio.run(run())
    assert _stored(redis_port) == _once(6, 8, 2)


def test_process_counters_read_a_bounded_page() -> None:
    counters = UsageCounters()
    minute = int(NOW // 60) * 60
    starts = [minute - 60 * i for i in range(5)][::-1]
    for i, start in enumerate(starts):
        for key_id in range(i + 1):  # bucket i holds i + 1 rows
            counters.add(start, "team-a", f"k{key_id}", "m", "llama2", 1, 1)
    everything, taken = asyncio.run(counters.read_page("1m", starts, None))
    assert taken == 5 and sum(len(rows) for rows in everything.values()) == 15
    page, taken = asyncio.run(counters.read_page("1m", starts, 6))  # (1 + 1) + (2 + 1) fit, + (3 + 1) not
    assert taken == 2 and list(page) == starts[:2]
    page, taken = asyncio.run(counters.read_page("1m", starts[4:], 1))  # one bucket always, whatever it holds
    assert taken == 1 and len(page[starts[4]]) == 5
