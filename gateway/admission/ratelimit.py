"""Per-tenant rate limits (requests/min, tokens/min, concurrency): the interface and the in-process limiter.

Both limiters share the semantics: RPM and TPM are exact sliding 60 s logs (not fixed windows, so a burst
straddling a minute boundary can't get 2x), tokens are reserved at admission and reconciled in `finish`,
and a refused request consumes nothing. The Redis limiter (ratelimit_redis.py) shares state across replicas;
this module's LocalRateLimiter serves single-replica deployments and is the Redis limiter's fail-open fallback.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

WINDOW_S = 60.0
# An in-flight entry whose finish() never came (its replica died, a bug) stops counting after this.
STALE_INFLIGHT_S = 15 * 60.0
# Retry-After for a refusal by concurrency: slots free on finish(), which no clock predicts.
CONCURRENCY_RETRY_S = 1.0
# On a TPM refusal we walk the oldest reservations to find when enough tokens free up; past this many
# we answer with the (safe, later) time the whole window empties, so a refusal costs bounded work.
RETRY_WALK_CAP = 256


@dataclass(frozen=True)
class Limits:
    """One tenant's limits; None means unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None

    @property
    def any(self) -> bool:
        """At least one limit is set."""
        return self.rpm is not None or self.tpm is not None or self.max_concurrent is not None


class RateLimited(Exception):
    """A limit refused the request; the gateway answers 429 with `headers` and `message`."""

    def __init__(self, limit: str, retry_after_s: int, headers: dict[str, str], message: str) -> None:
        super().__init__(message)
        self.limit = limit  # "requests" | "tokens" | "concurrency"
        self.retry_after_s = retry_after_s
        self.headers = headers
        self.message = message


class RateLimitUnavailable(Exception):
    """The shared limiter's store is down and the limiter fails closed; the gateway answers 503."""


class Admission:
    """An admitted request. finish() reconciles its tokens and frees its concurrency slot, exactly once.

    `release` is a plain function where the limiter needs no I/O (in-process windows) and a coroutine
    function where it does (Redis); `settle()` lets the request path skip the coroutine in the first case.
    """

    def __init__(self, headers: dict[str, str],
                 release: Callable[[int | None], Awaitable[None] | None]) -> None:
        self.headers = headers
        self._release = release
        self._finished = False

    def settle(self, actual_tokens: int | None = None) -> Awaitable[None] | None:
        """Finish what can be finished now; returns what is left to await (I/O), or None."""
        if self._finished:  # idempotent: the gateway may call it from both a finally and a stream's end
            return None
        self._finished = True
        return self._release(actual_tokens)

    async def finish(self, actual_tokens: int | None = None) -> None:
        pending = self.settle(actual_tokens)
        if pending is not None:
            await pending


class RateLimiter(Protocol):
    async def admit(self, tenant: str, limits: Limits, reserve_tokens: int) -> Admission: ...

    async def close(self) -> None: ...


@dataclass(slots=True)  # not frozen: made twice per request, and a frozen __init__ costs ~3x
class Usage:
    """A tenant's window as one admission saw it (after recording it, or unrecorded when refused).

    Waits are milliseconds until that limit would admit this request, None where it doesn't block;
    resets are milliseconds until that window is empty again (OpenAI's "reset to its initial state").
    """

    requests: int
    tokens: int
    inflight: int
    wait_requests_ms: float | None = None
    wait_tokens_ms: float | None = None
    wait_concurrency_ms: float | None = None
    too_large: bool = False
    reset_requests_ms: float = 0.0
    reset_tokens_ms: float = 0.0

    @property
    def admitted(self) -> bool:
        return self.wait_requests_ms is None and self.wait_tokens_ms is None and self.wait_concurrency_ms is None


def format_duration(ms: float) -> str:
    """OpenAI's (Go-style) duration strings: "12ms", "1s", "59.5s", "6m0s"."""
    ms = max(0, round(ms))
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest_ms = divmod(ms, 60_000)
    seconds = f"{rest_ms / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def ratelimit_headers(limits: Limits, usage: Usage) -> dict[str, str]:
    headers: dict[str, str] = {}
    if limits.rpm is not None:
        headers["x-ratelimit-limit-requests"] = str(limits.rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, limits.rpm - usage.requests))
        headers["x-ratelimit-reset-requests"] = format_duration(usage.reset_requests_ms)
    if limits.tpm is not None:
        headers["x-ratelimit-limit-tokens"] = str(limits.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, limits.tpm - usage.tokens))
        headers["x-ratelimit-reset-tokens"] = format_duration(usage.reset_tokens_ms)
    return headers


def refusal(limits: Limits, reserve_tokens: int, usage: Usage) -> RateLimited:
    """The 429 for a refused admission, naming the limit that holds it back longest."""
    waits = {
        "requests": usage.wait_requests_ms,
        "tokens": usage.wait_tokens_ms,
        "concurrency": usage.wait_concurrency_ms,
    }
    limit, wait_ms = max(((k, v) for k, v in waits.items() if v is not None), key=lambda kv: kv[1])
    retry_s = max(1, math.ceil(wait_ms / 1000))
    headers = ratelimit_headers(limits, usage)
    headers["retry-after"] = str(retry_s)
    headers["retry-after-ms"] = str(max(1, math.ceil(wait_ms)))  # the openai SDKs prefer the precise one
    if limit == "requests":
        message = f"Rate limit reached for requests per minute (limit {limits.rpm}). Retry in {retry_s}s."
    elif limit == "tokens" and usage.too_large:
        message = (
            f"Request too large for tokens per minute (limit {limits.tpm}, requested {reserve_tokens}). "
            "Reduce the prompt or max_tokens."
        )
    elif limit == "tokens":
        message = (
            f"Rate limit reached for tokens per minute (limit {limits.tpm}, used {usage.tokens}, "
            f"requested {reserve_tokens}). Retry in {retry_s}s."
        )
    else:
        message = f"Rate limit reached for concurrent requests (limit {limits.max_concurrent}). Retry in {retry_s}s."
    return RateLimited(limit, retry_s, headers, message)


# --- in-process limiter ---------------------------------------------------------------------------

_NO_LIMITS = Limits()


@dataclass(eq=False)
class _TenantWindow:
    """A tenant's last minute. The reservations are (time, id) tuples and their amounts a dict of ints:
    nothing in them for the cyclic collector to walk. As an object each (a minute of them, ~150,000 at
    c64) they were the bulk of what every young collection walked and all of what the older generation
    held: a ~40 ms collection every ~20 s."""

    requests: deque[float] = field(default_factory=deque)  # admission times, oldest first
    reservations: deque[tuple[float, int]] = field(default_factory=deque)  # (admitted at, id), oldest first
    amounts: dict[int, int] = field(default_factory=dict)  # id -> tokens, for the reservations in the window
    tokens: int = 0  # running sum of the live reservations, so a check is O(1)
    inflight: OrderedDict[int, float] = field(default_factory=OrderedDict)  # id -> start, oldest first

    def prune(self, now: float) -> None:
        # Each entry is appended once and popped once: amortised O(1) per request.
        cutoff = now - WINDOW_S
        while self.requests and self.requests[0] <= cutoff:
            self.requests.popleft()
        while self.reservations and self.reservations[0][0] <= cutoff:
            # Out of the window: a late finish() finds no amount and leaves the total alone.
            self.tokens -= self.amounts.pop(self.reservations.popleft()[1])
        stale = now - STALE_INFLIGHT_S
        while self.inflight and next(iter(self.inflight.values())) <= stale:
            self.inflight.popitem(last=False)

    def usage(self, limits: Limits, reserve: int, now: float) -> Usage:
        wait_req = wait_tok = wait_conc = None
        too_large = False
        if limits.rpm is not None and len(self.requests) >= limits.rpm:
            # Admitting needs len - rpm + 1 entries to expire; the last of those is at index len - rpm.
            idx = len(self.requests) - limits.rpm
            wait_req = (self.requests[idx] + WINDOW_S - now) * 1000 if idx < len(self.requests) else WINDOW_S * 1000
        if limits.tpm is not None and self.tokens + reserve > limits.tpm:
            too_large = reserve > limits.tpm
            wait_tok = WINDOW_S * 1000 if too_large else self._token_wait_ms(self.tokens + reserve - limits.tpm, now)
        if limits.max_concurrent is not None and len(self.inflight) >= limits.max_concurrent:
            wait_conc = CONCURRENCY_RETRY_S * 1000
        return Usage(
            requests=len(self.requests),
            tokens=self.tokens,
            inflight=len(self.inflight),
            wait_requests_ms=wait_req,
            wait_tokens_ms=wait_tok,
            wait_concurrency_ms=wait_conc,
            too_large=too_large,
            reset_requests_ms=(self.requests[-1] + WINDOW_S - now) * 1000 if self.requests else 0.0,
            reset_tokens_ms=(self.reservations[-1][0] + WINDOW_S - now) * 1000 if self.reservations else 0.0,
        )

    def _token_wait_ms(self, excess: int, now: float) -> float:
        freed = 0
        amounts = self.amounts
        for at, reservation in itertools.islice(self.reservations, RETRY_WALK_CAP):
            freed += amounts[reservation]
            if freed >= excess:
                return (at + WINDOW_S - now) * 1000
        last = self.reservations[-1][0] if self.reservations else now
        return (last + WINDOW_S - now) * 1000


class LocalRateLimiter:
    """Exact sliding-window limits held in this process.

    admit() never awaits between checking and recording, so on one event loop it is atomic without a lock.
    `clock` (seconds, monotonic) is injectable for tests.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tenants: dict[str, _TenantWindow] = {}
        self._ids = itertools.count()

    async def admit(self, tenant: str, limits: Limits, reserve_tokens: int) -> Admission:
        return self.admit_now(tenant, limits, reserve_tokens)

    def admit_now(self, tenant: str, limits: Limits, reserve_tokens: int) -> Admission:
        """admit() without the coroutine, for callers already on the loop (the Redis fallback)."""
        now = self._clock()
        window = self._tenants.get(tenant)
        if window is None:
            window = self._tenants[tenant] = _TenantWindow()
        window.prune(now)
        reserve = max(0, reserve_tokens)
        usage = window.usage(limits, reserve, now)
        if not usage.admitted:
            raise refusal(limits, reserve, usage)
        # Record only the limits that are set: an unlimited dimension needs no log.
        if limits.rpm is not None:
            window.requests.append(now)
        reservation: int | None = None
        if limits.tpm is not None:
            reservation = next(self._ids)
            window.reservations.append((now, reservation))
            window.amounts[reservation] = reserve
            window.tokens += reserve
        slot: int | None = None
        if limits.max_concurrent is not None:
            slot = next(self._ids)
            window.inflight[slot] = now
        headers = ratelimit_headers(limits, window.usage(_NO_LIMITS, 0, now))

        def release(actual: int | None) -> None:
            self._release(window, reservation, slot, actual)

        return Admission(headers, release)

    @staticmethod
    def _release(window: _TenantWindow, reservation: int | None, slot: int | None, actual: int | None) -> None:
        if slot is not None:
            window.inflight.pop(slot, None)
        if reservation is not None and actual is not None:
            reserved = window.amounts.get(reservation)
            if reserved is not None:  # still in the window: keep its time, swap the amount
                actual = max(0, actual)
                window.tokens += actual - reserved
                window.amounts[reservation] = actual

    async def close(self) -> None:
        self._tenants.clear()


def make_rate_limiter(redis_url: str | None, *, fail_closed: bool = False, admit_unknown_quotas: bool = False,
                      quota_used=None) -> RateLimiter:  # type: ignore[no-untyped-def]
    """The Redis limiter when a URL is configured (limits shared by every replica), else the in-process one.
    `quota_used`: see RedisRateLimiter (quotas that survive Redis)."""
    if not redis_url:
        return LocalRateLimiter()
    from gateway.admission.ratelimit_redis import RedisRateLimiter  # redis is only needed when configured

    return RedisRateLimiter(redis_url, fail_closed=fail_closed, admit_unknown_quotas=admit_unknown_quotas,
                            quota_used=quota_used)
