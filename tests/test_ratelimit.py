"""Per-tenant rate limits, in-process and shared through a real redis-server (started once for the module)."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator

import pytest
import redis
from redis.crc import key_slot

from gateway.admission.ratelimit import (
    Admission,
    Limits,
    LocalRateLimiter,
    RateLimited,
    RateLimiter,
    RateLimitUnavailable,
    format_duration,
    make_rate_limiter,
)
from gateway.admission.ratelimit_redis import _RECOUNT_CAP as RECOUNT_CAP
from gateway.admission.ratelimit_redis import RedisRateLimiter
from gateway.admission.redis_keys import tenant_prefix
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
        # Exactness with a healthy Redis, not its timeouts: 300 admissions at once open 2 x 32 connections,
        # which on a loaded 2-core box can take longer than the default 0.5 s connect timeout (then each
        # replica falls back to its own count, by design, and 150 would pass).
        replicas = [RedisRateLimiter(redis_url, connect_timeout_s=10, op_timeout_s=10) for _ in range(2)]
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

    with caplog.at_level(logging.WARNING, logger="gateway.admission.ratelimit"):
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


# --- malformed shared state: one tenant's keys must never break the limiter (for it or anyone else) ---------

KEYS = ("req", "tok", "toksum", "inf")
OURS = re.compile(rb"^[0-9a-f]{16}:\d+$")  # what the gateway writes: "<admission id>:<whole tokens>"


def server_ms(client: redis.Redis) -> int:
    secs, micros = client.time()
    return secs * 1000 + micros // 1000


def assert_token_state_heals(client: redis.Redis, prefix: str) -> None:
    """The gateway wrote only whole token counts, every member left parses (an older gateway's "<id>:100.0"
    may stay until it leaves the window), and the running sum is exactly their total."""
    members = client.zrange(f"{prefix}:tok", 0, -1)
    assert all(OURS.match(m) for m in members if re.match(rb"^[0-9a-f]{16}:", m)), members
    total = sum(int(float(m.rsplit(b":", 1)[1])) for m in members)  # ValueError: a garbage member remained
    toksum = client.get(f"{prefix}:toksum")
    assert toksum == (str(total).encode() if members else None), (toksum, members)


# name -> (plant garbage in tenant A's keys, A's remaining tokens after it admits 100 against tpm=1000).
# The values the old scripts could not parse made every admit for A error (or silently over-admit).
CORRUPTIONS: dict[str, tuple[Callable[[redis.Redis, str, int], object], int]] = {
    "float member, expired": (lambda c, p, now: (
        c.zadd(f"{p}:tok", {"old:100.0": now - 61_000, "live:200": now}), c.set(f"{p}:toksum", 300)), 700),
    "garbage member, expired": (lambda c, p, now: (
        c.zadd(f"{p}:tok", {"not a reservation": now - 61_000, "live:200": now}),
        c.set(f"{p}:toksum", 200)), 700),
    "float member, in window": (lambda c, p, now: (
        c.zadd(f"{p}:tok", {"x:100.0": now}), c.set(f"{p}:toksum", 100)), 800),
    "non-numeric toksum": (lambda c, p, now: (
        c.zadd(f"{p}:tok", {"live:200": now}), c.set(f"{p}:toksum", "lots")), 700),
    "negative toksum": (lambda c, p, now: (
        c.zadd(f"{p}:tok", {"live:200": now}), c.set(f"{p}:toksum", -5000)), 700),
    "missing toksum": (lambda c, p, now: c.zadd(f"{p}:tok", {"live:200": now}), 700),
    "toksum of the wrong type": (lambda c, p, now: (
        c.zadd(f"{p}:tok", {"live:200": now}), c.rpush(f"{p}:toksum", "x")), 700),
    "token log of the wrong type": (lambda c, p, now: (
        c.set(f"{p}:tok", "x"), c.set(f"{p}:toksum", 200)), 900),
    "request log of the wrong type": (lambda c, p, now: c.hset(f"{p}:req", "f", "v"), 900),
    "in-flight set of the wrong type": (lambda c, p, now: c.set(f"{p}:inf", "x"), 900),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_malformed_state_heals_and_never_touches_another_tenant(corruption: str, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    plant, remaining_tokens = CORRUPTIONS[corruption]
    a, b = tenant(), tenant()
    a_limits, b_limits = Limits(rpm=10, tpm=1000, max_concurrent=5), Limits(rpm=3, tpm=300, max_concurrent=2)

    async def main() -> None:
        # Fail closed: any fallback (the store "unavailable") would surface as RateLimitUnavailable.
        limiter = RedisRateLimiter(redis_url, fail_closed=True)
        try:
            b1 = await limiter.admit(b, b_limits, 100)
            plant(client, tenant_prefix(a), server_ms(client))
            first = await limiter.admit(a, a_limits, 100)
            assert first.headers["x-ratelimit-remaining-tokens"] == str(remaining_tokens)
            assert first.headers["x-ratelimit-remaining-requests"] == "9"
            assert_token_state_heals(client, tenant_prefix(a))
            b2 = await limiter.admit(b, b_limits, 100)
            await first.finish(50)  # reconciles against the healed state: 50 of the 100 come back
            second = await limiter.admit(a, a_limits, 0)
            assert second.headers["x-ratelimit-remaining-tokens"] == str(remaining_tokens + 50)
            assert second.headers["x-ratelimit-remaining-requests"] == "8"
            with pytest.raises(RateLimited) as over:  # Retry-After walks every reservation, planted ones too
                await limiter.admit(a, a_limits, 1000)
            assert over.value.limit == "tokens" and 59 <= over.value.retry_after_s <= 60
            assert over.value.headers["x-ratelimit-remaining-tokens"] == str(remaining_tokens + 50)
            assert_token_state_heals(client, tenant_prefix(a))
            # B's limits stayed exact throughout: 2 slots, then 3 requests / 300 tokens a minute.
            with pytest.raises(RateLimited) as busy:
                await limiter.admit(b, b_limits, 100)
            assert busy.value.limit == "concurrency"
            await b1.finish(100)
            b3 = await limiter.admit(b, b_limits, 100)
            assert b3.headers["x-ratelimit-remaining-requests"] == "0"
            assert b3.headers["x-ratelimit-remaining-tokens"] == "0"
            await b2.finish(100)
            with pytest.raises(RateLimited) as full:
                await limiter.admit(b, b_limits, 0)
            assert full.value.limit == "requests"
            assert limiter.redis_healthy and limiter.fallbacks == 0
        finally:
            await limiter.close()

    asyncio.run(main())


def test_garbage_reservation_in_the_window_is_skipped_when_a_refusal_walks_it(redis_url: str) -> None:
    client, name = redis.Redis.from_url(redis_url), tenant()
    prefix, now = tenant_prefix(name), server_ms(client)
    client.zadd(f"{prefix}:tok", {"junk": now - 1000, "a1:600": now})
    client.set(f"{prefix}:toksum", 600)

    async def main() -> None:
        limiter = RedisRateLimiter(redis_url, fail_closed=True)
        try:
            with pytest.raises(RateLimited) as refused:  # the walk for Retry-After meets "junk" first
                await limiter.admit(name, Limits(tpm=1000), 500)
            assert refused.value.limit == "tokens" and 59 <= refused.value.retry_after_s <= 60
            assert client.zscore(f"{prefix}:tok", "junk") is None  # removed, not just skipped
            admitted = await limiter.admit(name, Limits(tpm=1000), 400)
            assert admitted.headers["x-ratelimit-remaining-tokens"] == "0"
            assert_token_state_heals(client, prefix)
            assert limiter.redis_healthy and limiter.fallbacks == 0
        finally:
            await limiter.close()

    asyncio.run(main())


FINISH_CORRUPTIONS: dict[str, tuple[Callable[[redis.Redis, str], object], int]] = {
    # name -> (what breaks between A's admit and its finish, A's remaining tokens after admitting 900 more)
    "non-numeric toksum": (lambda c, p: c.set(f"{p}:toksum", "lots"), 0),
    "in-flight set of the wrong type": (lambda c, p: (c.delete(f"{p}:inf"), c.set(f"{p}:inf", "x")), 0),
    "token log of the wrong type": (lambda c, p: (c.delete(f"{p}:tok"), c.set(f"{p}:tok", "x")), 100),
}


@pytest.mark.parametrize("corruption", list(FINISH_CORRUPTIONS))
def test_a_finish_on_malformed_state_never_wedges_the_shared_limiter(corruption: str, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    plant, remaining_tokens = FINISH_CORRUPTIONS[corruption]
    a, b = tenant(), tenant()
    a_limits, b_limits = Limits(tpm=1000, max_concurrent=1), Limits(rpm=5, max_concurrent=1)

    async def main() -> None:
        limiter = RedisRateLimiter(redis_url, fail_closed=True)
        try:
            a_first = await limiter.admit(a, a_limits, 500)
            b_first = await limiter.admit(b, b_limits, 0)
            plant(client, tenant_prefix(a))
            await a_first.finish(100)  # used to fail, stay queued and trip the circuit for every tenant
            await b_first.finish(0)
            b_next = await limiter.admit(b, b_limits, 0)  # B's slot came back; no 503
            assert b_next.headers["x-ratelimit-remaining-requests"] == "3"
            a_next = await limiter.admit(a, a_limits, 900)  # A's slot came back and its 400 tokens too
            assert a_next.headers["x-ratelimit-remaining-tokens"] == str(remaining_tokens)
            assert_token_state_heals(client, tenant_prefix(a))
            assert limiter.redis_healthy and limiter.fallbacks == 0 and not limiter._pending_finishes
        finally:
            await limiter.close()

    asyncio.run(main())


def test_token_counts_are_written_as_whole_numbers_and_bad_ones_cannot_wedge_finishes(redis_url: str) -> None:
    client, a, b = redis.Redis.from_url(redis_url), tenant(), tenant()
    prefix = tenant_prefix(a)

    async def main() -> None:
        limiter = RedisRateLimiter(redis_url, fail_closed=True)
        try:
            first = await limiter.admit(a, Limits(tpm=1000), 100.0)  # type: ignore[arg-type]
            assert first.headers["x-ratelimit-remaining-tokens"] == "900"
            assert_token_state_heals(client, prefix)
            await first.finish(50.0)  # type: ignore[arg-type]  # a backend's usage said 50.0
            assert_token_state_heals(client, prefix)
            kept = [await limiter.admit(a, Limits(tpm=1000), 100) for _ in range(2)]
            await kept[0].finish(float("nan"))  # type: ignore[arg-type]
            await kept[1].finish("lots")  # type: ignore[arg-type]  # not a count: the reservation stands
            assert_token_state_heals(client, prefix)
            assert int(client.get(f"{prefix}:toksum")) == 250
            # B's finishes are not stuck behind A's bad ones: its only slot comes back.
            b_limits = Limits(max_concurrent=1)
            await (await limiter.admit(b, b_limits, 0)).finish(10)
            await (await limiter.admit(b, b_limits, 0)).finish(None)
            await limiter.admit(b, b_limits, 0)
            assert limiter.redis_healthy and limiter.fallbacks == 0 and not limiter._pending_finishes
        finally:
            await limiter.close()

    asyncio.run(main())


def test_tenant_names_can_never_reach_another_tenants_keys(redis_url: str) -> None:
    base = tenant()
    odd = ["", "{x}:y", "{x", "}", "}:req", "%7Bx", "%257Bx", ":req", ":x", "%", "%25", "ä", "\udcff", "A", "{}"]
    names = [base + suffix for suffix in odd] + ["{" + base + "}", base.upper()]
    prefixes = [tenant_prefix(name) for name in names]
    assert len(set(prefixes)) == len(names)  # injective
    for prefix in prefixes:
        tag = prefix[len("gw:rl:{") : -1]
        assert prefix.endswith("}") and "{" not in tag and "}" not in tag and ":" not in tag
        # A tenant's keys share one Cluster slot (its script touches all four).
        assert len({key_slot(f"{prefix}:{k}".encode("utf-8", "surrogatepass")) for k in KEYS}) == 1
    with pytest.raises(ValueError):
        tenant_prefix("")  # "{}" is no hash tag: refused rather than spread over slots

    async def main() -> None:
        limiter = RedisRateLimiter(redis_url, fail_closed=True)
        try:
            for name in names:  # each gets its own single request; a shared key would refuse a later name
                admission = await limiter.admit(name, Limits(rpm=1), 0)
                assert admission.headers["x-ratelimit-remaining-requests"] == "0"
            for name in names:
                with pytest.raises(RateLimited):
                    await limiter.admit(name, Limits(rpm=1), 0)
        finally:
            await limiter.close()

    asyncio.run(main())


def test_an_error_reply_for_one_tenant_degrades_only_that_tenant(redis_url: str) -> None:
    a, b = tenant(), tenant()
    broken = tenant_prefix(a)

    async def main() -> None:
        limiter = RedisRateLimiter(redis_url, fail_closed=True)
        real_admit, real_finish = limiter._admit_script, limiter._finish_script
        a_first = await limiter.admit(a, Limits(max_concurrent=1), 0)
        b_first = await limiter.admit(b, Limits(max_concurrent=1), 0)

        def failing(real: Callable[..., Awaitable[object]]) -> Callable[..., Awaitable[object]]:
            async def script(keys: list[str], args: list[object]) -> object:
                if keys[0].startswith(broken):  # whatever a tenant's keys might still do to a script
                    raise redis.ResponseError("ERR user_script:1: something about this tenant's keys")
                return await real(keys=keys, args=args)

            return script

        limiter._admit_script = failing(real_admit)  # type: ignore[method-assign]
        limiter._finish_script = failing(real_finish)  # type: ignore[method-assign]
        try:
            with pytest.raises(RateLimitUnavailable):  # A itself is degraded, as configured (fail-closed)
                await limiter.admit(a, Limits(rpm=5), 0)
            await a_first.finish(0)  # rejected: dropped, not retried ahead of everyone else's finishes
            await b_first.finish(0)  # B's slot comes back
            limits = Limits(rpm=3, max_concurrent=1)
            for left in ("2", "1"):
                admission = await limiter.admit(b, limits, 0)  # no 503 for B, no open circuit
                assert admission.headers["x-ratelimit-remaining-requests"] == left
                await admission.finish(0)
            assert limiter.redis_healthy and limiter.fallbacks == 1 and limiter.script_errors == 3
            assert not limiter._pending_finishes
            # An error that means the server is unusable for everyone still opens the circuit.
            read_only = redis.exceptions.ReadOnlyError("READONLY You can't write against a read only replica.")
            limiter._admit_script = failing_all(read_only)  # type: ignore[method-assign]
            with pytest.raises(RateLimitUnavailable):
                await limiter.admit(b, limits, 0)
            assert not limiter.redis_healthy
        finally:
            await limiter.close()

    asyncio.run(main())


def failing_all(exc: Exception) -> Callable[..., Awaitable[object]]:
    async def script(keys: list[str], args: list[object]) -> object:
        raise exc

    return script


def test_a_repair_of_a_huge_token_log_is_bounded(redis_url: str) -> None:
    # Recounting a corrupted sum reads the whole log inside Redis, which every tenant shares. Past the cap,
    # the log is dropped instead: this tenant's TPM window restarts empty, and nobody else waits on it.
    client, name = redis.Redis.from_url(redis_url), tenant()
    prefix, now = tenant_prefix(name), server_ms(client)
    client.zadd(f"{prefix}:tok", {f"m{i}:1": now for i in range(RECOUNT_CAP + 1)})
    client.set(f"{prefix}:toksum", "lots")

    async def main() -> None:
        limiter = RedisRateLimiter(redis_url, fail_closed=True)
        try:
            admission = await limiter.admit(name, Limits(tpm=100_000), 100)
            assert admission.headers["x-ratelimit-remaining-tokens"] == str(100_000 - 100)
            assert client.zcard(f"{prefix}:tok") == 1 and client.get(f"{prefix}:toksum") == b"100"
            assert limiter.redis_healthy and limiter.fallbacks == 0
        finally:
            await limiter.close()

    asyncio.run(main())
