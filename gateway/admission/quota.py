"""Token quotas per tenant: `limits.tokens_per_day` and `limits.tokens_per_month`, UTC calendar periods.

The same reserve/reconcile pattern as TPM: a request reserves its worst case (prompt estimate + max_tokens)
at admission, refused when the reservation would take a period past its quota; when the answer is complete
the reservation is swapped for the engine's count. So a quota is never exceeded by an admitted request's
reservation, and what stays charged is what the engines reported.

Without Redis the counts live in this process (`LocalQuotas`). With `GATEWAY_REDIS_URL` they are shared
exactly by every replica (`RedisQuotas`): one Lua script per admission and one per finish, periods decided
on Redis' clock (TIME), one hash per tenant:

  gw:rl:{t}:quota  HASH  d=<UTC day number> du=<tokens that day> m=<year*12+month-1> mu=<tokens that month>

A period that ended is reset by the next admission (its number no longer matches). The key expires 32 days
after the tenant's last admission. Both periods are always counted, so the usage API can show them.
Only tenants with a quota pay for any of this: the pipeline calls the quota limiter for them alone.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from gateway.admission.ratelimit import format_duration

DAY_S = 86_400
KEY_TTL_S = 32 * DAY_S


@dataclass(frozen=True)
class Quotas:
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None

    def __bool__(self) -> bool:
        return self.tokens_per_day is not None or self.tokens_per_month is not None


@dataclass(frozen=True)
class Periods:
    """A tenant's current periods and what they hold (after the admission, or unrecorded when refused)."""

    now_s: float
    day: int
    month: int
    day_used: int
    month_used: int


class QuotaExceeded(Exception):
    def __init__(self, message: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers


class QuotaUnavailable(Exception):
    """Redis is down: the caller decides (fail open on local counts, or closed)."""


class QuotaGrant:
    """An admitted reservation; finish() reconciles it exactly once (None keeps the reservation)."""

    def __init__(self, headers: dict[str, str], release: Callable[[int | None], Awaitable[None]]) -> None:
        self.headers = headers
        self._release = release
        self._done = False

    async def finish(self, actual: int | None) -> None:
        if not self._done:
            self._done = True
            await self._release(actual)


@functools.lru_cache(maxsize=64)
def month_number(day: int) -> int:
    d = datetime.fromtimestamp(day * DAY_S, timezone.utc)
    return d.year * 12 + d.month - 1


def day_reset(day: int) -> datetime:
    return datetime.fromtimestamp((day + 1) * DAY_S, timezone.utc)


@functools.lru_cache(maxsize=64)
def month_reset(month: int) -> datetime:
    year, index = divmod(month + 1, 12)
    return datetime(year, index + 1, 1, tzinfo=timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def status(quotas: Quotas, p: Periods) -> dict:
    """What the usage API shows of a tenant's quotas."""
    out: dict = {}
    if quotas.tokens_per_day is not None:
        out["tokens_per_day"] = {"limit": quotas.tokens_per_day, "used": p.day_used,
                                 "remaining": max(0, quotas.tokens_per_day - p.day_used),
                                 "resets_at": _iso(day_reset(p.day))}
    if quotas.tokens_per_month is not None:
        out["tokens_per_month"] = {"limit": quotas.tokens_per_month, "used": p.month_used,
                                   "remaining": max(0, quotas.tokens_per_month - p.month_used),
                                   "resets_at": _iso(month_reset(p.month))}
    return out


def headers(quotas: Quotas, p: Periods) -> dict[str, str]:
    """x-gateway-quota-remaining-tokens / -reset: of the quota with the fewest tokens left (on every
    admitted request of a quota tenant: no dictionaries or date formatting here)."""
    limit = remaining = reset_s = None
    if quotas.tokens_per_day is not None:
        limit, remaining, reset_s = quotas.tokens_per_day, quotas.tokens_per_day - p.day_used, (p.day + 1) * DAY_S
    if quotas.tokens_per_month is not None and (remaining is None or
                                                quotas.tokens_per_month - p.month_used < remaining):
        limit, remaining = quotas.tokens_per_month, quotas.tokens_per_month - p.month_used
        reset_s = month_reset(p.month).timestamp()
    return {"x-gateway-quota-limit-tokens": str(limit),
            "x-gateway-quota-remaining-tokens": str(max(0, remaining)),
            "x-gateway-quota-reset": format_duration((reset_s - p.now_s) * 1000)}


def exceeded(quotas: Quotas, p: Periods, reserve: int, which: str) -> QuotaExceeded:
    limit = getattr(quotas, which)
    used = p.day_used if which == "tokens_per_day" else p.month_used
    reset = day_reset(p.day) if which == "tokens_per_day" else month_reset(p.month)
    period = "daily" if which == "tokens_per_day" else "monthly"
    message = (f"You exceeded your {period} token quota ({which}: {limit} tokens, {used} used, this request "
               f"reserves {reserve}). It resets at {_iso(reset)} (UTC).")
    out = headers(quotas, p)
    out["x-gateway-quota-exceeded"] = which
    return QuotaExceeded(message, out)


def _which(quotas: Quotas, day_used: int, month_used: int, reserve: int) -> str | None:
    if quotas.tokens_per_day is not None and day_used + reserve > quotas.tokens_per_day:
        return "tokens_per_day"
    if quotas.tokens_per_month is not None and month_used + reserve > quotas.tokens_per_month:
        return "tokens_per_month"
    return None


class LocalQuotas:
    """Per-process quota counts. admit() never awaits between check and record: atomic on one loop.

    A gateway without Redis starts them from the ledger (`seed`, the use of this day and month per tenant),
    so a restart hands out no fresh quotas; until that read succeeded (`ready` False: the database was
    down at start) quota tenants are refused with QuotaUnavailable, unless `admit_unready` (the operator's
    GATEWAY_QUOTA_OUTAGE_UNKNOWN_TENANTS=admit) lets them start from zero."""

    shared = False

    def __init__(self, clock: Callable[[], float] = time.time, *, ready: bool = True,
                 admit_unready: bool = False) -> None:
        self._clock = clock
        self._tenants: dict[str, list[int]] = {}  # tenant -> [day, day_used, month, month_used]
        self.ready = ready
        self._admit_unready = admit_unready

    def seed(self, used: dict[str, tuple[int, int, int, int]]) -> None:
        """Start from these totals, {tenant: (day, day_used, month, month_used)}, never below what this
        process counted already (a period that is not the current one counts nothing)."""
        for tenant, (day, day_used, month, month_used) in used.items():
            state, _ = self._state(tenant)
            if state[0] == day:
                state[1] = max(state[1], day_used)
            if state[2] == month:
                state[3] = max(state[3], month_used)
        self.ready = True

    def _state(self, tenant: str) -> tuple[list[int], float]:
        now = self._clock()
        day = math.floor(now / DAY_S)
        month = month_number(day)
        state = self._tenants.setdefault(tenant, [day, 0, month, 0])
        if state[0] != day:
            state[0:2] = [day, 0]
        if state[2] != month:
            state[2:4] = [month, 0]
        return state, now

    async def admit(self, tenant: str, quotas: Quotas, reserve: int) -> QuotaGrant:
        return self.admit_now(tenant, quotas, reserve)

    def admit_now(self, tenant: str, quotas: Quotas, reserve: int) -> QuotaGrant:
        if not self.ready and not self._admit_unready:
            raise QuotaUnavailable("This replica has not read its tenants' quota use from the database yet "
                                   "(it was unreachable at start).")
        state, now = self._state(tenant)
        reserve = max(0, int(reserve))
        which = _which(quotas, state[1], state[3], reserve)
        if which is not None:
            raise exceeded(quotas, Periods(now, state[0], state[2], state[1], state[3]), reserve, which)
        state[1] += reserve
        state[3] += reserve
        day, month = state[0], state[2]
        self._charged(tenant, day, reserve, month, reserve)

        async def release(actual: int | None) -> None:
            if actual is None:
                return
            delta = max(0, int(actual)) - reserve
            day_delta = month_delta = 0
            if state[0] == day:
                day_delta = max(0, state[1] + delta) - state[1]
                state[1] += day_delta
            if state[2] == month:
                month_delta = max(0, state[3] + delta) - state[3]
                state[3] += month_delta
            self._charged(tenant, day, day_delta, month, month_delta)

        return QuotaGrant(headers(quotas, Periods(now, day, month, state[1], state[3])), release)

    def _charged(self, tenant: str, day: int, day_delta: int, month: int, month_delta: int) -> None:
        """A change of a tenant's counts (a reservation, or its reconciliation); for subclasses."""

    async def periods(self, tenant: str) -> Periods:
        state, now = self._state(tenant)
        return Periods(now, state[0], state[2], state[1], state[3])

    async def close(self) -> None:
        self._tenants.clear()


class OutageQuotas(LocalQuotas):
    """A replica's quota counts while Redis is unreachable: they continue from the last totals Redis showed
    this replica (an outage must not hand out fresh quotas), and what was spent meanwhile is kept, per
    tenant and period, to be written back when Redis returns (`owed`, drained by the Redis limiter).

    A tenant this replica never saw in Redis has no known total: `knows()` says so and the caller refuses
    it, or admits it from zero where the operator chose that."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock)
        self._seen: dict[str, tuple[int, int, int, int]] = {}  # tenant -> day, day_used, month, month_used
        self._epochs: dict[str, str] = {}  # tenant -> the quota hash's seed epoch ("e") when last seen
        self._seeded: set[str] = set()  # tenants continued from _seen in the current outage
        # (tenant, day, month) -> [day tokens, month tokens, day baseline, month baseline, epoch] not yet in Redis
        self.owed: dict[tuple[str, int, int], list] = {}

    def saw(self, tenant: str, day: int, day_used: int, month: int, month_used: int, epoch: str = "") -> None:
        """What Redis holds for the tenant (after an admission there): the start of any later outage.
        `epoch`: which seed of the hash that was (gateway/admission/quota_reseed.py)."""
        self._seen[tenant] = (day, day_used, month, month_used)
        self._epochs[tenant] = epoch
        self._seeded.discard(tenant)

    def knows(self, tenant: str) -> bool:
        return tenant in self._seen or tenant in self._seeded

    def last_known(self, tenant: str) -> tuple[int, int, int, int] | None:
        """This replica's latest idea of the tenant's totals (day, day_used, month, month_used): its outage
        count where one continued, else what Redis last showed it; None when it has neither."""
        if tenant in self._seeded and tenant in self._tenants:
            day, day_used, month, month_used = self._tenants[tenant]
            return day, day_used, month, month_used
        return self._seen.get(tenant)

    def forget_owed(self, tenant: str) -> None:
        """Drop what the tenant owes Redis: a reseed from the ledger already counts it."""
        for key in [key for key in self.owed if key[0] == tenant]:
            del self.owed[key]

    def admit_now(self, tenant: str, quotas: Quotas, reserve: int) -> QuotaGrant:
        if tenant not in self._seeded and tenant in self._seen:
            day, day_used, month, month_used = self._seen[tenant]
            self._tenants[tenant] = [day, day_used, month, month_used]  # _state() resets a period that ended
            self._seeded.add(tenant)
        return super().admit_now(tenant, quotas, reserve)

    def _charged(self, tenant: str, day: int, day_delta: int, month: int, month_delta: int) -> None:
        key = (tenant, day, month)
        owed = self.owed.get(key)
        if owed is None:
            seen = self._seen.get(tenant)
            owed = self.owed[key] = [0, 0, seen[1] if seen and seen[0] == day else 0,
                                     seen[3] if seen and seen[2] == month else 0, self._epochs.get(tenant, "")]
        owed[0] += day_delta
        owed[1] += month_delta

    def take_owed(self) -> dict[tuple[str, int, int], list]:
        owed, self.owed = self.owed, {}
        return owed

    def give_back(self, owed: dict[tuple[str, int, int], list]) -> None:
        """Write-back failed: keep it for the next attempt, merged with what was spent meanwhile."""
        for key, entry in owed.items():
            mine = self.owed.setdefault(key, [0, 0, entry[2], entry[3], entry[4]])
            mine[0] += entry[0]
            mine[1] += entry[1]


def make_quotas(redis_url: str | None, *, fail_closed: bool = False, ready: bool = True,
                admit_unready: bool = False):
    if not redis_url:
        return LocalQuotas(ready=ready, admit_unready=admit_unready)
    from gateway.admission.quota_redis import RedisQuotas

    return RedisQuotas(redis_url, fail_closed=fail_closed)
