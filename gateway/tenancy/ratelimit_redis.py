"""Rate limits shared exactly by every gateway replica, kept in Redis.

Each admit is ONE Lua script (check requests, tokens and concurrency, then record all three or nothing), so
concurrent replicas can't both take the last slot; each finish is one more. Time comes from the Redis server
(TIME inside the script), so replicas with skewed clocks still agree on the window.

Keys, per tenant (the braces are a Redis Cluster hash tag: one tenant's keys share a slot, as a script needs):
  gw:rl:{t}:req    ZSET  member=admission id,            score=ms  (sliding request log)
  gw:rl:{t}:tok    ZSET  member="<id>:<reserved tokens>", score=ms  (token reservations)
  gw:rl:{t}:toksum STR   running sum of the reservations in :tok   (the TPM check is O(1), no scan)
  gw:rl:{t}:inf    ZSET  member=admission id,            score=ms  (in flight; stale after 15 min)
Expired entries are pruned with ZRANGEBYSCORE/ZREMRANGEBYSCORE from the old end: each entry is removed once,
amortised O(1) per request. Every key carries a TTL, so an idle tenant's keys vanish.

If Redis is down or errors, we fail open onto an in-process LocalRateLimiter (per replica, so N replicas may
admit up to N x the limit during an outage), or, with fail_closed, raise RateLimitUnavailable.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections import deque

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.tenancy.ratelimit import (
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

log = logging.getLogger("gateway.tenancy.ratelimit")

_WINDOW_MS = int(WINDOW_S * 1000)
_STALE_MS = int(STALE_INFLIGHT_S * 1000)

# KEYS: req, tok, toksum, inf.  ARGV: rpm, tpm, max_concurrent (-1 = unlimited), reserve, id, window_ms,
# stale_ms, walk_cap.  Returns {admitted, requests, tokens, inflight, wait_req, wait_tok, wait_conc,
# too_large, reset_req, reset_tok}; waits in ms, -1 where that limit doesn't block.
_ADMIT_LUA = """
local rpm, tpm, maxc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reserve, id = tonumber(ARGV[4]), ARGV[5]
local window, stale, cap = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cutoff = now - window

-- Prune what left the window. Only the expired head is read, so this is amortised O(1).
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
local total = tonumber(redis.call('GET', KEYS[3]) or '0')
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)
for _, m in ipairs(expired) do total = total - tonumber(string.match(m, ':(%-?%d+)$')) end
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff) end
if redis.call('ZCARD', KEYS[2]) == 0 then total = 0 end  -- self-heal: an empty log sums to zero
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - stale)
local nreq, ninf = redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[4])

local wait_req, wait_tok, wait_conc, too_large = -1, -1, -1, 0
if rpm >= 0 and nreq >= rpm then
  -- Admitting needs nreq - rpm + 1 entries to expire; the last of them has rank nreq - rpm.
  local e = redis.call('ZRANGE', KEYS[1], nreq - rpm, nreq - rpm, 'WITHSCORES')
  if #e > 0 then wait_req = tonumber(e[2]) + window - now else wait_req = window end
end
if tpm >= 0 and total + reserve > tpm then
  if reserve > tpm then
    too_large, wait_tok = 1, window
  else
    -- Walk the oldest reservations (bounded) until enough tokens would have freed up.
    local need, freed = total + reserve - tpm, 0
    local e = redis.call('ZRANGE', KEYS[2], 0, cap - 1, 'WITHSCORES')
    for i = 1, #e, 2 do
      freed = freed + tonumber(string.match(e[i], ':(%-?%d+)$'))
      if freed >= need then wait_tok = tonumber(e[i + 1]) + window - now break end
    end
    if wait_tok < 0 then  -- past the cap: answer when the whole window has emptied (later, so safe)
      local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
      if #last > 0 then wait_tok = tonumber(last[2]) + window - now else wait_tok = window end
    end
  end
end
if maxc >= 0 and ninf >= maxc then wait_conc = 1000 end
local admitted = 0
if wait_req < 0 and wait_tok < 0 and wait_conc < 0 then
  admitted = 1
  if rpm >= 0 then
    redis.call('ZADD', KEYS[1], now, id)
    nreq = nreq + 1
  end
  if tpm >= 0 then
    redis.call('ZADD', KEYS[2], now, id .. ':' .. ARGV[4])  -- the caller's digits, as finish rebuilds them
    total = total + reserve
  end
  if maxc >= 0 then
    redis.call('ZADD', KEYS[4], now, id)
    ninf = ninf + 1
  end
end
-- The token sum is written with the same TTL as its log, so neither outlives the other.
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('SET', KEYS[3], total, 'PX', window)
  redis.call('PEXPIRE', KEYS[2], window)
else
  redis.call('DEL', KEYS[3])
end
if admitted == 1 then
  if rpm >= 0 then redis.call('PEXPIRE', KEYS[1], window) end
  if maxc >= 0 then redis.call('PEXPIRE', KEYS[4], stale) end
end
local reset_req, reset_tok = 0, 0
local lr = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if #lr > 0 then reset_req = tonumber(lr[2]) + window - now end
local lt = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
if #lt > 0 then reset_tok = tonumber(lt[2]) + window - now end
return {admitted, nreq, total, ninf, wait_req, wait_tok, wait_conc, too_large, reset_req, reset_tok}
"""

# KEYS: tok, toksum, inf.  ARGV: id, reserved, actual (-1 = keep the reservation), window_ms.
# Swaps the reservation's amount for the actual usage, keeping its timestamp, and frees the slot.
_FINISH_LUA = """
local id, reserved, actual, window = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREM', KEYS[3], id)
if actual >= 0 then
  local member = id .. ':' .. reserved
  local score = redis.call('ZSCORE', KEYS[1], member)
  if score then  -- absent: it already left the window, nothing to reconcile
    redis.call('ZREM', KEYS[1], member)
    redis.call('ZADD', KEYS[1], score, id .. ':' .. ARGV[3])
    local total = tonumber(redis.call('GET', KEYS[2]) or '0') + actual - tonumber(reserved)
    redis.call('SET', KEYS[2], total, 'PX', window)
    redis.call('PEXPIRE', KEYS[1], window)
  end
end
return 1
"""

# What "Redis is unavailable" looks like (TimeoutError and ConnectionRefusedError are OSErrors too).
_STORE_ERRORS = (RedisError, OSError)

_UNSAFE = re.compile(r"[^A-Za-z0-9._@-]")


def tenant_prefix(tenant: str) -> str:
    # Percent-escape anything odd (braces above all, which would break the hash tag) so names can't collide.
    safe = _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), tenant)
    return f"gw:rl:{{{safe}}}"


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
    ) -> None:
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
        self._admit_script = self._redis.register_script(_ADMIT_LUA)
        self._finish_script = self._redis.register_script(_FINISH_LUA)
        self._fail_closed = fail_closed
        self._probe_interval_s = probe_interval_s
        self._fallback = LocalRateLimiter()
        self._healthy = True
        self._skip_until = 0.0  # during an outage, try Redis again only after this (monotonic)
        self._pending_finishes: deque[tuple[str, str, int, int | None]] = deque(maxlen=10_000)
        self.fallbacks = 0  # admissions decided without Redis (fail-open) or refused (fail-closed)

    @property
    def redis_healthy(self) -> bool:
        return self._healthy

    async def admit(self, tenant: str, limits: Limits, reserve_tokens: int) -> Admission:
        reserve = max(0, reserve_tokens)
        if not self._healthy:
            if time.monotonic() < self._skip_until:
                # Circuit open: don't make every request wait for a connect timeout during an outage.
                return self._degraded(tenant, limits, reserve)
            # Probe: replay the finishes the outage swallowed first, so their slots are free for this check.
            if not await self._flush_pending():
                return self._degraded(tenant, limits, reserve)
        prefix = tenant_prefix(tenant)
        admission_id = uuid.uuid4().hex[:16]
        keys = [f"{prefix}:req", f"{prefix}:tok", f"{prefix}:toksum", f"{prefix}:inf"]
        args: list[int | str] = [_arg(limits.rpm), _arg(limits.tpm), _arg(limits.max_concurrent)]
        args += [reserve, admission_id, _WINDOW_MS, _STALE_MS, RETRY_WALK_CAP]
        try:
            reply = await self._admit_script(keys=keys, args=args)
        except _STORE_ERRORS as exc:
            # A timed-out script may still have run: queue its undo (zero tokens, free the slot) for the
            # recovery, so a phantom admission can't hold a concurrency slot for 15 minutes.
            self._pending_finishes.append((prefix, admission_id, reserve, 0))
            self._mark_down(exc)
            return self._degraded(tenant, limits, reserve)
        self._mark_up()
        usage = _usage(reply)
        if not usage.admitted:
            raise refusal(limits, reserve, usage)

        async def release(actual: int | None) -> None:
            await self._finish(prefix, admission_id, reserve, actual)

        return Admission(ratelimit_headers(limits, usage), release)

    async def _finish(self, prefix: str, admission_id: str, reserved: int, actual: int | None) -> None:
        # Queued, not dropped, while Redis is down: else a blip would hold the tenant's slot for 15 min.
        self._pending_finishes.append((prefix, admission_id, reserved, actual))
        if self._healthy:  # during an outage the next probe replays it
            await self._flush_pending()

    def _degraded(self, tenant: str, limits: Limits, reserve: int) -> Admission:
        self.fallbacks += 1
        if self._fail_closed:
            raise RateLimitUnavailable("The rate limiter's store (Redis) is unavailable.")
        return self._fallback.admit_now(tenant, limits, reserve)

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
        idempotent (ZREM of a gone id and a reconcile of a gone member are no-ops)."""
        while self._pending_finishes:
            item = self._pending_finishes.popleft()  # popped first: concurrent flushers take distinct items
            prefix, admission_id, reserved, actual = item
            keys = [f"{prefix}:tok", f"{prefix}:toksum", f"{prefix}:inf"]
            try:
                await self._finish_script(keys=keys, args=_finish_args(admission_id, reserved, actual))
            except BaseException as exc:  # cancelled too (a client hung up): keep it queued, replay is safe
                self._pending_finishes.appendleft(item)
                if not isinstance(exc, _STORE_ERRORS):
                    raise
                self._mark_down(exc)
                return False
        return True

    async def close(self) -> None:
        await self._fallback.close()
        await self._redis.aclose()


def _arg(limit: int | None) -> int:
    return -1 if limit is None else max(0, limit)


def _finish_args(admission_id: str, reserved: int, actual: int | None) -> list[str | int]:
    return [admission_id, reserved, -1 if actual is None else max(0, actual), _WINDOW_MS]


def _usage(reply: list[int]) -> Usage:
    admitted, nreq, tokens, ninf, wait_req, wait_tok, wait_conc, too_large, reset_req, reset_tok = (
        int(v) for v in reply
    )

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
    assert usage.admitted == bool(admitted), "admit script and Usage disagree"
    return usage
