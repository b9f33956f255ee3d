"""Token quotas shared exactly by every replica, in Redis (layout and semantics: gateway/admission/quota.py).

One Lua script admits (check both periods, then reserve in both or neither) on Redis' clock; one more
reconciles at the end of the answer, in the periods the reservation was made in. Malformed state (a field
that does not parse, a key of the wrong type) counts as 0 and is overwritten, never an error. If Redis is
down we fail open onto per-process counts (LocalQuotas), or, with fail_closed, raise QuotaUnavailable.
"""

from __future__ import annotations

import logging

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.admission.ratelimit_lua import LUA_HELPERS as _LUA_HELPERS
from gateway.admission.redis_keys import tenant_prefix
from gateway.admission.quota_lua import PERIODS_LUA
from gateway.admission.quota import (KEY_TTL_S, LocalQuotas, Periods, QuotaGrant, Quotas, QuotaUnavailable,
                                 exceeded, headers)

log = logging.getLogger("gateway.admission.quota")

# KEYS: quota hash.  ARGV: per_day, per_month (-1 = none), reserve, ttl_s.
# Returns {admitted, which (0 ok, 1 day, 2 month), now_ms, day, month, day_used, month_used}.
_ADMIT_LUA = _LUA_HELPERS + PERIODS_LUA + """
local now, day, month, du, mu = quota_periods(KEYS[1])
local reserve = count(ARGV[3]) or 0
local which = quota_check(tonumber(ARGV[1]), tonumber(ARGV[2]), du, mu, reserve)
if which == 0 then
  du, mu = du + reserve, mu + reserve
  quota_reserve(KEYS[1], day, month, du, mu, tonumber(ARGV[4]))
end
return {which == 0 and 1 or 0, which, now, day, month, du, mu}
"""

# KEYS: quota hash.  ARGV: day, month (of the admission), reserved, actual.
_FINISH_LUA = _LUA_HELPERS + PERIODS_LUA + """
quota_reconcile(KEYS[1], count(ARGV[1]), count(ARGV[2]), count(ARGV[3]) or 0, count(ARGV[4]) or 0)
return 1
"""

_READ_LUA = _LUA_HELPERS + PERIODS_LUA + "return {quota_periods(KEYS[1])}"

_ERRORS = (RedisError, OSError)


class RedisQuotas:
    shared = True

    def __init__(self, redis_url: str, *, fail_closed: bool = False, op_timeout_s: float = 1.0) -> None:
        pool = BlockingConnectionPool.from_url(redis_url, max_connections=32, timeout=op_timeout_s,
                                               socket_connect_timeout=0.5, socket_timeout=op_timeout_s,
                                               retry=Retry(NoBackoff(), 0), retry_on_timeout=False)
        self._redis = Redis(connection_pool=pool)
        self._admit = self._redis.register_script(_ADMIT_LUA)
        self._finish = self._redis.register_script(_FINISH_LUA)
        self._read = self._redis.register_script(_READ_LUA)
        self._fail_closed = fail_closed
        self._fallback = LocalQuotas()
        self._warned = False

    def _degraded(self, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            log.warning("Redis unavailable for token quotas (%s); %s.", exc,
                        "refusing quota tenants (fail-closed)" if self._fail_closed else "counting per replica")
        if self._fail_closed:
            raise QuotaUnavailable(f"The quota store (Redis) is unavailable ({type(exc).__name__}).") from None

    async def admit(self, tenant: str, quotas: Quotas, reserve: int) -> QuotaGrant:
        key = f"{tenant_prefix(tenant)}:quota"
        reserve = max(0, int(reserve))
        try:
            reply = await self._admit(keys=[key], args=[_arg(quotas.tokens_per_day), _arg(quotas.tokens_per_month),
                                                        reserve, KEY_TTL_S])
        except _ERRORS as exc:
            self._degraded(exc)
            return self._fallback.admit_now(tenant, quotas, reserve)
        self._warned = False
        admitted, which, now_ms, day, month, du, mu = (int(v) for v in reply)
        periods = Periods(now_ms / 1000, day, month, du, mu)
        if not admitted:
            raise exceeded(quotas, periods, reserve, "tokens_per_day" if which == 1 else "tokens_per_month")

        async def release(actual: int | None) -> None:
            if actual is None:
                return
            try:
                await self._finish(keys=[key], args=[day, month, reserve, max(0, int(actual))])
            except _ERRORS as exc:  # the reservation stays charged: safe side of the quota
                log.warning("Quota reconcile for %r failed (%s); its reservation stays charged.", tenant, exc)

        return QuotaGrant(headers(quotas, periods), release)

    async def periods(self, tenant: str) -> Periods:
        try:
            now_ms, day, month, du, mu = (int(v) for v in await self._read(keys=[f"{tenant_prefix(tenant)}:quota"]))
        except _ERRORS:
            return await self._fallback.periods(tenant)
        return Periods(now_ms / 1000, day, month, du, mu)

    async def close(self) -> None:
        await self._redis.aclose()


def _arg(limit: int | None) -> int:
    return -1 if limit is None else int(limit)
