"""Rate limits shared exactly by every gateway replica, kept in Redis.

Each admit is ONE Lua script (check requests, tokens and concurrency, then record all three or nothing), so
concurrent replicas can't both take the last slot; each finish is one more. Time comes from the Redis server
(TIME inside the script), so replicas with skewed clocks still agree on the window.

Keys and tenant isolation: gateway/admission/redis_keys.py. The scripts treat a tenant's keys as untrusted:
a member that doesn't parse counts as 0 tokens and is removed, a bad running sum is recounted, and a key of
the wrong type is dropped. Token counts are sent as whole numbers (int(), never float), so the gateway
never writes a member it can't read back. An error reply to one tenant's script degrades only that request
and doesn't open the circuit for everyone. A finish that Redis rejects is dropped, not retried ahead of
every other tenant's finish.

If Redis is down, we fail open onto an in-process LocalRateLimiter (per replica, so N replicas may admit up
to N x the limit during an outage), or, with fail_closed, raise RateLimitUnavailable.
"""

from __future__ import annotations

import asyncio
import logging
import math
import numbers
import time
import uuid
from collections import deque

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, OutOfMemoryError, ReadOnlyError, RedisError, ResponseError

from gateway.admission.quota import (DAY_S, KEY_TTL_S, OutageQuotas, Periods, Quotas, QuotaUnavailable,
                                     month_number)
from gateway.admission.quota import exceeded as quota_exceeded
from gateway.admission.quota import headers as quota_headers
from gateway.admission.quota_reseed import Reseeder, UsedFromLedger
from gateway.admission.ratelimit_lua import ADMIT_LUA, FINISH_LUA, QUOTA_WRITE_BACK_LUA
from gateway.admission.redis_keys import tenant_prefix
from gateway.admission.ratelimit import (
    RETRY_WALK_CAP,
    STALE_INFLIGHT_S,
    WINDOW_S,
    Admission,
    Limits,
    LocalRateLimiter,
    RateLimitUnavailable,
    Usage,
    ratelimit_headers,
    refusal,
)

log = logging.getLogger("gateway.admission.ratelimit")

_WINDOW_MS = int(WINDOW_S * 1000)
_STALE_MS = int(STALE_INFLIGHT_S * 1000)
# Token counts stay below 2**53, so Redis' Lua (doubles) holds them exactly.
_MAX_TOKENS = 2**53 - 1
# A running token sum that needs repairing is recounted from at most this many reservations. A larger log
# is dropped instead, so a repair can't block Redis, which every tenant shares, for long.
_RECOUNT_CAP = 10_000
# An open quota reservation whose finish never came (its replica died) is forgotten after this: its tokens
# stay charged. Longer than any generation (the CPU fallback's total timeout is 30 minutes).
_OPEN_RESERVATION_MS = 2 * 3600 * 1000
# Warn about one tenant's malformed state at most this often, so a broken tenant can't flood the log.
_WARN_EVERY_S = 10.0


# What "Redis is unavailable" looks like (TimeoutError and ConnectionRefusedError are OSErrors too).
_STORE_ERRORS = (RedisError, OSError)
# Error replies that mean the server is unusable for everyone (a read-only replica after a failover,
# maxmemory, ACLs). Any other error reply concerns one call, so one tenant's keys.
_SERVER_WIDE = (ReadOnlyError, OutOfMemoryError, NoPermissionError)


def _tenant_local(exc: BaseException) -> bool:
    return isinstance(exc, ResponseError) and not isinstance(exc, _SERVER_WIDE)


def _tokens(value: object) -> int | None:
    """A token count as a whole number for Redis (int(), never float), clamped to [0, _MAX_TOKENS]. None if
    `value` isn't a finite number: "100.0" or "nan" written into a member is state the scripts can't parse."""
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return min(max(0, int(value)), _MAX_TOKENS)
    return None


class RedisRateLimiter:
    """The shared limiter. `redis_healthy` and `fallbacks` are for metrics."""

    def __init__(
        self,
        redis_url: str,
        *,
        fail_closed: bool = False,
        connect_timeout_s: float = 0.5,
        op_timeout_s: float = 1.0,
        probe_interval_s: float = 1.0,
        max_connections: int = 32,
        admit_unknown_quotas: bool = False,
        quota_used: UsedFromLedger | None = None,
    ) -> None:
        """`quota_used(tenant)`: the tenant's use this day and month from the ledger, to reseed a quota
        that Redis lost (gateway/admission/quota_reseed.py); None: a lost quota restarts from zero."""
        # A blocking pool: a burst queues briefly for a connection instead of failing with "Too many
        # connections" (which would wrongly fail open). No client-side retries: a retried admit whose
        # first reply was lost would record twice.
        pool = BlockingConnectionPool.from_url(
            redis_url,
            max_connections=max_connections,
            timeout=op_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=op_timeout_s,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
        )
        self._redis = Redis(connection_pool=pool)
        self._admit_script = self._redis.register_script(ADMIT_LUA)
        self._finish_script = self._redis.register_script(FINISH_LUA)
        self._write_back_script = self._redis.register_script(QUOTA_WRITE_BACK_LUA)
        self._fail_closed = fail_closed
        # During an outage: admit a quota tenant this replica has no total for (from zero), or refuse it.
        self._admit_unknown_quotas = admit_unknown_quotas
        self._probe_interval_s = probe_interval_s
        self._fallback = LocalRateLimiter()
        self._quota_fallback = OutageQuotas()  # continues from what Redis showed; owes what it spent
        self._reseeder = (Reseeder(self._redis, quota_used, self._quota_fallback, admit_unknown_quotas)
                          if quota_used is not None else None)
        self._healthy = True
        self._skip_until = 0.0  # during an outage, try Redis again only after this (monotonic)
        self._pending_finishes: deque[tuple[str, str, int, int | None, tuple[int, int] | None]] = deque(maxlen=10_000)
        self.fallbacks = 0  # admissions decided without Redis (fail-open) or refused (fail-closed)
        self.script_errors = 0  # error replies to one tenant's script (which don't open the circuit)
        self._warned: dict[str, float] = {}  # tenant prefix -> when we last warned about its state

    @property
    def redis_healthy(self) -> bool:
        return self._healthy

    admits_quotas = True  # token quotas are checked in the same script (gateway/admission/quota.py)

    async def admit(self, tenant: str, limits: Limits, reserve_tokens: int, quotas: Quotas | None = None,
                    *, _again: bool = False) -> Admission:
        reserve = _tokens(reserve_tokens)
        if reserve is None:
            raise ValueError(f"reserve_tokens must be a finite number, not {reserve_tokens!r}")
        prefix = tenant_prefix(tenant)
        if not self._healthy:
            if time.monotonic() < self._skip_until:
                # Circuit open: don't make every request wait for a connect timeout during an outage.
                return await self._degraded(tenant, limits, reserve, quotas)
            # Probe: replay the finishes the outage swallowed first, so their slots are free for this check.
            if not await self._flush_pending():
                return await self._degraded(tenant, limits, reserve, quotas)
        elif self._quota_fallback.owed and not await self._write_back_quotas():  # spent in an outage
            return await self._degraded(tenant, limits, reserve, quotas)
        admission_id = uuid.uuid4().hex[:16]
        keys = [f"{prefix}:req", f"{prefix}:tok", f"{prefix}:toksum", f"{prefix}:inf"]
        args: list[int | str] = [_arg(limits.rpm), _arg(limits.tpm), _arg(limits.max_concurrent)]
        args += [reserve, admission_id, _WINDOW_MS, _STALE_MS, RETRY_WALK_CAP, _RECOUNT_CAP]
        if quotas:
            keys += [f"{prefix}:quota", f"{prefix}:qres"]
            args += [_arg(quotas.tokens_per_day), _arg(quotas.tokens_per_month), KEY_TTL_S, _OPEN_RESERVATION_MS,
                     1 if self._reseeder is not None else 0]
        try:
            reply = await self._admit_script(keys=keys, args=args)
            if quotas and int(reply[11]) == 3 and self._reseeder is not None:  # Redis lost the quota's counts
                await self._reseeder.reseed(tenant, f"{prefix}:quota")  # QuotaUnavailable: refused
                args[-1] = 0  # seeded now (or from zero, as the operator chose): count, don't ask again
                reply = await self._admit_script(keys=keys, args=args)
        except _STORE_ERRORS as exc:
            # A timed-out (or failed: Redis doesn't roll a script back) script may still have recorded: queue
            # its undo (zero tokens, free the slot, give back a quota reservation it made), so a phantom
            # admission can't hold a slot for 15 minutes or tokens of the quota. The undo touches only what
            # the admission recorded (the finish script checks), in the periods of the local clock.
            self._pending_finishes.append((prefix, admission_id, reserve, 0, _local_periods() if quotas else None))
            if _tenant_local(exc):
                # Redis answered: it is up, and the error concerns this tenant's keys. Degrade only this
                # request; opening the circuit would degrade every tenant on this replica.
                self.script_errors += 1
                self._warn(prefix, "Redis rejected the rate-limit script for tenant %r (%s); admitting it %s.",
                           tenant, exc, "nothing (fail-closed)" if self._fail_closed else "by local limits")
            elif isinstance(exc, RedisConnectionError) and not _again and await self._flush_pending():
                # A pooled connection that a restarted Redis had closed: this attempt is undone (just
                # replayed, on a new connection), so admitting once more is safe; one outage it was not.
                return await self.admit(tenant, limits, reserve, quotas, _again=True)
            else:
                self._mark_down(exc)
            return await self._degraded(tenant, limits, reserve, quotas)
        self._mark_up()
        usage, repaired = _usage(reply)
        periods = None
        if quotas:
            which, now_ms, day, month, du, mu = (int(v) for v in reply[11:17])
            periods = Periods(now_ms / 1000, day, month, du, mu)
            epoch = reply[17] if len(reply) > 17 else b""
            self._quota_fallback.saw(tenant, day, du, month, mu,
                                     epoch.decode() if isinstance(epoch, bytes) else str(epoch or ""))
            if which and usage.admitted:  # the rate limits would admit it: the quota is what refuses
                raise quota_exceeded(quotas, periods, reserve, "tokens_per_day" if which == 1 else "tokens_per_month")
        if repaired:
            self._warn(prefix, "Repaired malformed rate-limit state in Redis for tenant %r (keys %s:*).",
                       tenant, prefix)
        if not usage.admitted:
            raise refusal(limits, reserve, usage)

        async def release(actual: int | None) -> None:
            # Not a finite number (a backend's odd usage figure): keep the reservation rather than guess.
            await self._finish(prefix, admission_id, reserve, None if actual is None else _tokens(actual), quota)

        quota = None if periods is None else (periods.day, periods.month)
        headers = ratelimit_headers(limits, usage)
        if quotas and periods is not None:
            headers.update(quota_headers(quotas, periods))
        return Admission(headers, release)

    async def _finish(self, prefix: str, admission_id: str, reserved: int, actual: int | None,
                      quota: tuple[int, int] | None = None) -> None:
        # Queued, not dropped, while Redis is down: else a blip would hold the tenant's slot for 15 min.
        self._pending_finishes.append((prefix, admission_id, reserved, actual, quota))
        if self._healthy:  # during an outage the next probe replays it
            await self._flush_pending()

    async def _degraded(self, tenant: str, limits: Limits, reserve: int, quotas: Quotas | None) -> Admission:
        self.fallbacks += 1
        if self._fail_closed:
            if quotas:
                raise QuotaUnavailable("The quota store (Redis) is unavailable.")
            raise RateLimitUnavailable("The rate limiter's store (Redis) is unavailable.")
        if not quotas:
            return self._fallback.admit_now(tenant, limits, reserve)
        if not self._admit_unknown_quotas and not self._quota_fallback.knows(tenant):
            # No total seen for this tenant: admitting from zero would hand it a fresh quota.
            raise QuotaUnavailable("The quota store (Redis) is unavailable and this replica has not seen "
                                   "this tenant's quota use yet.")
        grant = self._quota_fallback.admit_now(tenant, quotas, reserve)  # QuotaExceeded: nothing recorded
        try:
            admission = self._fallback.admit_now(tenant, limits, reserve)
        except BaseException:
            await grant.finish(0)
            raise

        async def release(actual: int | None) -> None:
            await admission.finish(actual)
            await grant.finish(actual)

        return Admission({**admission.headers, **grant.headers}, release)

    def _warn(self, prefix: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._warned.get(prefix, -math.inf) < _WARN_EVERY_S:
            return
        if len(self._warned) >= 1000:  # bounded: many broken tenants at once only lose some throttling
            self._warned.clear()
        self._warned[prefix] = now
        log.warning(message, *args)

    def _mark_down(self, exc: BaseException) -> None:
        self._skip_until = time.monotonic() + self._probe_interval_s
        if self._healthy:  # warn once per outage, not once per request
            self._healthy = False
            log.warning(
                "Redis rate limiter unavailable (%s: %s); %s until it returns.",
                type(exc).__name__,
                exc,
                "refusing requests (fail-closed)" if self._fail_closed else "enforcing limits per replica",
            )

    def _mark_up(self) -> None:
        if not self._healthy:
            self._healthy = True
            log.warning("Redis rate limiter is back; limits are shared across replicas again.")

    async def _flush_pending(self) -> bool:
        """Replay swallowed finishes; False if Redis failed again. Safe to replay: the finish script is
        idempotent (ZREM of a gone id and a reconcile of a gone member are no-ops).

        The queue is shared by all tenants, so an item that can never succeed is dropped, never put back at
        the head: there it would block every later finish and keep the circuit open for everyone."""
        while self._pending_finishes:
            item = self._pending_finishes.popleft()  # popped first: concurrent flushers take distinct items
            prefix, admission_id, reserved, actual, quota = item
            keys = [f"{prefix}:tok", f"{prefix}:toksum", f"{prefix}:inf"]
            args = _finish_args(admission_id, reserved, actual)
            if quota is not None:
                keys += [f"{prefix}:quota", f"{prefix}:qres"]
                args += list(quota)
            try:
                await self._finish_script(keys=keys, args=args)
            except _STORE_ERRORS as exc:
                if _tenant_local(exc):  # Redis is up and refused this one: its slot goes stale in 15 min
                    self.script_errors += 1
                    self._warn(prefix, "Redis rejected a rate-limit finish for %s:* (%s); dropped it.",
                               prefix, exc)
                    continue
                self._pending_finishes.appendleft(item)  # Redis is down: replay it on recovery
                self._mark_down(exc)
                return False
            except asyncio.CancelledError:  # a client hung up mid-call: keep it queued, replay is safe
                self._pending_finishes.appendleft(item)
                raise
            except Exception:  # a bug, not Redis: don't retry it forever ahead of everyone else's
                log.exception("Rate-limit finish for %s:* failed; dropped it.", prefix)
        return await self._write_back_quotas() if self._quota_fallback.owed else True

    async def _write_back_quotas(self) -> bool:
        """Add what tenants spent on this replica's outage counts to Redis' quota hashes; False if Redis
        failed (kept for the next attempt). A hash that Redis lost (a restart without persistence) is
        reseeded from the ledger and this replica's count instead (which hold the outage's tokens already);
        without a ledger it starts from the total this replica last saw."""
        owed = self._quota_fallback.take_owed()
        items = list(owed.items())
        reseeded: set[str] = set()
        for index, ((tenant, day, month), (day_tokens, month_tokens, day_base, month_base, epoch)) in enumerate(items):
            if (not day_tokens and not month_tokens) or tenant in reseeded:
                continue
            key = f"{tenant_prefix(tenant)}:quota"
            try:
                lost = await self._write_back_script(keys=[key], args=[
                    day, month, day_tokens, month_tokens, day_base, month_base, KEY_TTL_S,
                    1 if self._reseeder is not None else 0, epoch])
                if lost == 2 and self._reseeder is not None:
                    reseeded.add(tenant)
                    try:
                        await self._reseeder.reseed(tenant, key)
                    except QuotaUnavailable:
                        pass  # nothing known here: its next admission reseeds it, or is refused
            except _STORE_ERRORS as exc:
                if _tenant_local(exc):
                    self.script_errors += 1
                    self._warn(tenant_prefix(tenant), "Redis rejected a quota write-back for %r (%s); dropped it.",
                               tenant, exc)
                    continue
                self._quota_fallback.give_back(dict(items[index:]))
                self._mark_down(exc)
                return False
            except asyncio.CancelledError:
                self._quota_fallback.give_back(dict(items[index:]))
                raise
        return True

    async def close(self) -> None:
        await self._fallback.close()
        await self._redis.aclose()


def _local_periods() -> tuple[int, int]:
    day = math.floor(time.time() / DAY_S)
    return day, month_number(day)


def _arg(limit: int | None) -> int:
    if limit is None:
        return -1
    value = _tokens(limit)
    if value is None:
        raise ValueError(f"a rate limit must be a finite number or None, not {limit!r}")
    return value


def _finish_args(admission_id: str, reserved: int, actual: int | None) -> list[str | int]:
    return [admission_id, reserved, -1 if actual is None else actual, _WINDOW_MS, _RECOUNT_CAP]


def _usage(reply: list[int]) -> tuple[Usage, bool]:
    """The admission's Usage, and whether the script had to repair the tenant's state."""
    admitted, nreq, tokens, ninf, wait_req, wait_tok, wait_conc, too_large, reset_req, reset_tok, repaired = (
        int(v) for v in reply[:11]
    )
    quota_refused = int(reply[11]) != 0

    def wait(ms: int) -> float | None:
        return None if ms < 0 else float(ms)

    usage = Usage(
        requests=nreq,
        tokens=tokens,
        inflight=ninf,
        wait_requests_ms=wait(wait_req),
        wait_tokens_ms=wait(wait_tok),
        wait_concurrency_ms=wait(wait_conc),
        too_large=bool(too_large),
        reset_requests_ms=float(reset_req),
        reset_tokens_ms=float(reset_tok),
    )
    assert usage.admitted == bool(admitted) or quota_refused, "admit script and Usage disagree"
    return usage, bool(repaired)
