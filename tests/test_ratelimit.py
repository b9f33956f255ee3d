"""Per-tenant rate limits, in-process and shared through a real redis-server (started once for the module)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator

import pytest
import redis

from gateway.tenancy.ratelimit import (
    Admission,
    Limits,
    LocalRateLimiter,
    RateLimited,
    RateLimiter,
    RateLimitUnavailable,
    format_duration,
    make_rate_limiter,
)
from gateway.tenancy.ratelimit_redis import RedisRateLimiter, tenant_prefix
from tests.support.processes import free_port

REDIS_SERVER = shutil.which("redis-server")


def start_redis(port: int) -> subprocess.Popen[bytes]:
    argv = [str(REDIS_SERVER), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if client.ping():
                return process
        except redis.ConnectionError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not start")


def stop_redis(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    port = free_port()
    process = start_redis(port)
    yield f"redis://127.0.0.1:{port}/0"
    stop_redis(process)


def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"  # a fresh tenant per test: the module's Redis is shared


def run_with(kind: str, url: str, body: Callable[[RateLimiter], Awaitable[None]]) -> None:
    """Run body against a fresh limiter of `kind`, on its own event loop (redis clients are loop-bound)."""

    async def main() -> None:
        limiter = make_rate_limiter(url if kind == "redis" else None)
        try:
            await body(limiter)
        finally:
            await limiter.close()

    asyncio.run(main())


KINDS = ["local", "redis"]


def test_duration_strings_look_like_openais() -> None:
    assert [format_duration(ms) for ms in (12, 999.6, 1000, 59_500, 60_000, 360_000, 61_250)] == [
        "12ms", "1s", "1s", "59.5s", "1m0s", "6m0s", "1m1.25s",
    ]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_burst_admits_exactly_rpm_and_429_explains(kind: str, redis_url: str) -> None:
    async def body(limiter: RateLimiter) -> None:
        name, limits = tenant(), Limits(rpm=5, tpm=10_000)
        remaining = []
        for _ in range(5):
            admission = await limiter.admit(name, limits, 100)
            remaining.append(admission.headers["x-ratelimit-remaining-requests"])
            assert admission.headers["x-ratelimit-limit-requests"] == "5"
            assert admission.headers["x-ratelimit-limit-tokens"] == "10000"
            assert admission.headers["x-ratelimit-reset-requests"] in ("1m0s", "59.999s")
        assert remaining == ["4", "3", "2", "1", "0"]
        for _ in range(3):
            with pytest.raises(RateLimited) as refused:
                await limiter.admit(name, limits, 100)
        err = refused.value
        assert err.limit == "requests" and 59 <= err.retry_after_s <= 60
        assert err.headers["retry-after"] == str(err.retry_after_s)
        assert err.headers["x-ratelimit-remaining-requests"] == "0"
        assert err.headers["x-ratelimit-remaining-tokens"] == "9500"  # refusals consumed nothing
        assert "requests per minute (limit 5)" in err.message and f"Retry in {err.retry_after_s}s" in err.message

    run_with(kind, redis_url, body)


@pytest.mark.parametrize("kind", KINDS)
def test_unset_limits_are_unlimited_and_omit_headers(kind: str, redis_url: str) -> None:
    async def body(limiter: RateLimiter) -> None:
        name = tenant()
        for _ in range(50):
            admission = await limiter.admit(name, Limits(tpm=1_000_000), 10)
        assert "x-ratelimit-limit-requests" not in admission.headers
        assert admission.headers["x-ratelimit-remaining-tokens"] == str(1_000_000 - 500)
        assert (await limiter.admit(name, Limits(), 10**9)).headers == {}

    run_with(kind, redis_url, body)


@pytest.mark.parametrize("kind", KINDS)
def test_tokens_reserved_then_reconciled(kind: str, redis_url: str) -> None:
    async def body(limiter: RateLimiter) -> None:
        name, limits = tenant(), Limits(tpm=1000)
        first = await limiter.admit(name, limits, 500)
        second = await limiter.admit(name, limits, 500)
        assert second.headers["x-ratelimit-remaining-tokens"] == "0"
        with pytest.raises(RateLimited) as refused:
            await limiter.admit(name, limits, 500)
        assert refused.value.limit == "tokens" and 59 <= refused.value.retry_after_s <= 60
        assert "tokens per minute (limit 1000, used 1000, requested 500)" in refused.value.message
        await first.finish(100)  # 400 reserved tokens come back
        await first.finish(100)  # idempotent: no second refund
        third = await limiter.admit(name, limits, 400)
        assert third.headers["x-ratelimit-remaining-tokens"] == "0"
        await second.finish(None)  # None keeps the reservation
        with pytest.raises(RateLimited):
            await limiter.admit(name, limits, 1)
        with pytest.raises(RateLimited) as too_large:  # can never fit, whatever the window holds
            await limiter.admit(tenant(), limits, 1001)
        assert too_large.value.limit == "tokens" and "Request too large" in too_large.value.message

    run_with(kind, redis_url, body)


@pytest.mark.parametrize("kind", KINDS)
def test_concurrency_slots(kind: str, redis_url: str) -> None:
    async def body(limiter: RateLimiter) -> None:
        name, limits = tenant(), Limits(max_concurrent=2)
        first = await limiter.admit(name, limits, 0)
        await limiter.admit(name, limits, 0)
        with pytest.raises(RateLimited) as refused:
            await limiter.admit(name, limits, 0)
        assert refused.value.limit == "concurrency" and refused.value.retry_after_s == 1
        assert "concurrent requests (limit 2)" in refused.value.message
        await first.finish(0)
        await first.finish(0)
        await limiter.admit(name, limits, 0)
        with pytest.raises(RateLimited):
            await limiter.admit(name, limits, 0)

    run_with(kind, redis_url, body)


def test_two_replicas_share_one_redis_exactly(redis_url: str) -> None:
    async def main() -> None:
        replicas = [RedisRateLimiter(redis_url), RedisRateLimiter(redis_url)]
        name, limits = tenant(), Limits(rpm=100, tpm=1_000_000, max_concurrent=1000)

        async def one(i: int) -> Admission | None:
            try:
                return await replicas[i % 2].admit(name, limits, 10)
            except RateLimited:
                return None

        results = await asyncio.gather(*(one(i) for i in range(300)))
        admitted = [r for r in results if r is not None]
        assert len(admitted) == 100
        # Atomic check-and-record: every admission saw a distinct count.
        assert sorted(int(a.headers["x-ratelimit-remaining-requests"]) for a in admitted) == list(range(100))
        assert all(r.redis_healthy and r.fallbacks == 0 for r in replicas)
        for r in replicas:
            await r.close()

    asyncio.run(main())


def test_keys_are_namespaced_and_expire(redis_url: str) -> None:
    name = tenant()

    async def body(limiter: RateLimiter) -> None:
        await limiter.admit(name, Limits(rpm=5, tpm=100, max_concurrent=3), 10)

    run_with("redis", redis_url, body)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    prefix = f"gw:rl:{{{name}}}"
    assert sorted(client.keys(f"{prefix}:*")) == [
        f"{prefix}:inf", f"{prefix}:req", f"{prefix}:tok", f"{prefix}:toksum",
    ]  # fmt: skip
    for key in ("req", "tok", "toksum"):
        assert 0 < client.pttl(f"{prefix}:{key}") <= 60_000
    assert 60_000 < client.pttl(f"{prefix}:inf") <= 15 * 60_000
    assert tenant_prefix("a{b}:c") == "gw:rl:{a%7Bb%7D%3Ac}"


def test_redis_prunes_entries_older_than_the_window(redis_url: str) -> None:
    # Plant a full window that is 61 s old, with a matching running sum: admit must prune it all.
    name = tenant()
    prefix, client = tenant_prefix(name), redis.Redis.from_url(redis_url)
    secs, micros = client.time()
    old = secs * 1000 + micros // 1000 - 61_000
    client.zadd(f"{prefix}:req", {f"old{i}": old for i in range(5)})
    client.zadd(f"{prefix}:tok", {"old0:600": old, "old1:400": old})
    client.set(f"{prefix}:toksum", 1000)

    async def body(limiter: RateLimiter) -> None:
        admission = await limiter.admit(name, Limits(rpm=5, tpm=1000), 300)
        assert admission.headers["x-ratelimit-remaining-requests"] == "4"
        assert admission.headers["x-ratelimit-remaining-tokens"] == "700"

    run_with("redis", redis_url, body)
    assert client.zcard(f"{prefix}:req") == 1 and client.get(f"{prefix}:toksum") == b"300"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sliding_window_has_no_boundary_burst() -> None:
    async def main() -> None:
        clock = FakeClock()
        limiter, name, limits = LocalRateLimiter(clock=clock), tenant(), Limits(rpm=10, tpm=1000)
        start = clock.now

        async def burst(at: float, retry_s: int) -> int:
            clock.now = start + at
            admitted = 0
            for _ in range(15):
                try:
                    await limiter.admit(name, limits, 10)
                    admitted += 1
                except RateLimited as err:
                    last = err
            if admitted < 15:
                assert last.retry_after_s == retry_s
            return admitted

        # A fixed per-minute window would admit 10 at 0:59 and 10 more at 1:01.
        assert await burst(59, retry_s=60) == 10
        assert await burst(61, retry_s=58) == 0
        assert await burst(118.5, retry_s=1) == 0
        assert await burst(119, retry_s=60) == 10  # the 0:59 admissions left the window at 1:59

    asyncio.run(main())


def test_local_token_window_and_stale_slots_expire() -> None:
    async def main() -> None:
        clock = FakeClock()
        limiter, name = LocalRateLimiter(clock=clock), tenant()
        limits = Limits(tpm=1000, max_concurrent=1)
        old = await limiter.admit(name, limits, 800)  # never finished: its replica "died"
        clock.now += 30
        with pytest.raises(RateLimited) as refused:
            await limiter.admit(name, Limits(tpm=1000), 300)
        assert refused.value.retry_after_s == 30  # when the 800 leave the window
        clock.now += 30
        assert (await limiter.admit(name, Limits(tpm=1000), 300)).headers["x-ratelimit-remaining-tokens"] == "700"
        with pytest.raises(RateLimited):
            await limiter.admit(name, limits, 0)  # the slot is still held...
        clock.now += 15 * 60
        fresh = await limiter.admit(name, limits, 0)  # ...until it goes stale
        await old.finish(5)  # a late finish of an expired reservation must not corrupt the sum
        assert fresh.headers["x-ratelimit-remaining-tokens"] == "1000"
        assert (await limiter.admit(name, Limits(tpm=1000), 1000)).headers["x-ratelimit-remaining-tokens"] == "0"

    asyncio.run(main())


def test_fail_open_on_unreachable_redis_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        limiter = RedisRateLimiter(f"redis://127.0.0.1:{free_port()}/0", probe_interval_s=0.05)
        name, limits = tenant(), Limits(rpm=3)
        admitted = 0
        for _ in range(5):
            try:
                await limiter.admit(name, limits, 0)
                admitted += 1
            except RateLimited:
                pass
            await asyncio.sleep(0.03)  # lets the circuit re-probe a few times
        assert admitted == 3  # local limits still apply
        assert not limiter.redis_healthy and limiter.fallbacks == 5
        await limiter.close()

    with caplog.at_level(logging.WARNING, logger="gateway.tenancy.ratelimit"):
        asyncio.run(main())
    assert sum("unavailable" in r.getMessage() for r in caplog.records) == 1


def test_fail_closed_raises_unavailable() -> None:
    async def main() -> None:
        limiter = make_rate_limiter(f"redis://127.0.0.1:{free_port()}/0", fail_closed=True)
        for _ in range(2):
            with pytest.raises(RateLimitUnavailable):
                await limiter.admit(tenant(), Limits(rpm=3), 0)
        await limiter.close()

    asyncio.run(main())


def test_redis_dies_mid_flight_then_recovers() -> None:
    port = free_port()
    process = start_redis(port)

    async def main() -> None:
        limiter = RedisRateLimiter(f"redis://127.0.0.1:{port}/0", probe_interval_s=0.05)
        name, limits = tenant(), Limits(rpm=100, max_concurrent=5)
        in_flight = await limiter.admit(name, limits, 0)
        stop_redis(process)
        started = time.monotonic()
        degraded = [await limiter.admit(name, limits, 0) for _ in range(5)]  # local: 5 slots of its own
        await in_flight.finish(0)  # queued for the recovery
        assert time.monotonic() - started < 2 and not limiter.redis_healthy and limiter.fallbacks == 5
        with pytest.raises(RateLimited):
            await limiter.admit(name, limits, 0)
        for admission in degraded:
            await admission.finish(0)
        revived = start_redis(port)
        try:
            await asyncio.sleep(0.1)
            admission = await limiter.admit(name, limits, 0)
            assert limiter.redis_healthy and admission.headers["x-ratelimit-remaining-requests"] == "99"
            assert not limiter._pending_finishes
        finally:
            await limiter.close()
            stop_redis(revived)

    asyncio.run(main())
