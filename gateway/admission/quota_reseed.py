"""Quotas that survive Redis: when Redis comes back empty (a restart without persistence, a failover to a
fresh replica), a tenant's use of the current day and month is reloaded from the usage ledger before its
next admission, so an empty Redis hands out no fresh quota.

The admit script finds the tenant's quota hash missing and says so (quota_which 3) before it counts
anything; `Reseeder.reseed` then reads the tenant's use from the ledger (the `used` callable the gateway
hands over: gateway.store's period_usage, after this replica's own rows are written), takes the larger of
that and this replica's own last count (what Redis showed it, plus what it spent during an outage: that
covers reservations still in flight and the last flush interval of rows), and writes it with
QUOTA_SEED_LUA, set if absent: when two replicas reseed at once, the first one's seed stands and the
other's is a no-op, so nothing is counted twice. One reseed per tenant at a time on a replica; concurrent
admissions of that tenant wait for it. The seed marks the hash with a random epoch: a replica that spent
during an outage and last saw the hash before the seed (another epoch) merges its outage count into it
(the larger of the two) instead of adding it, since the ledger the seed was read from holds that spend.

When the ledger cannot be read and this replica knows nothing of the tenant, the tenant is refused
(QuotaUnavailable, 503) unless the operator chose to admit unknown tenants from zero
(GATEWAY_QUOTA_OUTAGE_UNKNOWN_TENANTS=admit), as during a Redis outage.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable

from gateway.admission.quota import KEY_TTL_S, OutageQuotas, QuotaUnavailable
from gateway.admission.ratelimit_lua import QUOTA_SEED_LUA

log = logging.getLogger("gateway.admission.quota")

Totals = tuple[int, int, int, int]  # day number, tokens that day, month number, tokens that month
UsedFromLedger = Callable[[str], Awaitable[Totals]]
READ_TIMEOUT_S = 3.0


def merged(a: Totals | None, b: Totals | None) -> Totals | None:
    """The larger count of each period, where both know it; a later period wins over an earlier one."""
    if a is None or b is None:
        return a if b is None else b
    day = max(a[0], b[0])
    month = max(a[2], b[2])
    day_used = max((t[1] for t in (a, b) if t[0] == day), default=0)
    month_used = max((t[3] for t in (a, b) if t[2] == month), default=0)
    return day, day_used, month, month_used


class Reseeder:
    def __init__(self, redis, used: UsedFromLedger, known: OutageQuotas,  # type: ignore[no-untyped-def]
                 admit_unknown: bool) -> None:
        self._seed_script = redis.register_script(QUOTA_SEED_LUA)
        self._used = used
        self._known = known
        self._admit_unknown = admit_unknown
        self._running: dict[str, asyncio.Future] = {}

    async def reseed(self, tenant: str, quota_key: str) -> None:
        """Seed the tenant's missing quota hash; raises QuotaUnavailable (refuse) or a Redis error."""
        running = self._running.get(tenant)
        if running is None:
            running = self._running[tenant] = asyncio.ensure_future(self._reseed(tenant, quota_key))
            running.add_done_callback(lambda _: self._running.pop(tenant, None))
        await asyncio.shield(running)  # one waiter cancelled (its client left) doesn't stop the others'

    async def _reseed(self, tenant: str, quota_key: str) -> None:
        from_ledger: Totals | None = None
        try:
            from_ledger = await asyncio.wait_for(self._used(tenant), READ_TIMEOUT_S)
        except Exception as exc:  # the database is down too: this replica's own count, if it has one
            log.warning("Redis has no quota counts for tenant %r and the ledger cannot be read (%s: %s)",
                        tenant, type(exc).__name__, str(exc)[:200])
        totals = merged(from_ledger, self._known.last_known(tenant))
        if totals is None:
            if self._admit_unknown:
                return  # admitted from zero, as the operator chose
            raise QuotaUnavailable("The quota store (Redis) lost this tenant's quota use and the ledger cannot "
                                   "be read right now.")
        day, day_used, month, month_used = totals
        seeded = await self._seed_script(keys=[quota_key], args=[day, day_used, month, month_used, KEY_TTL_S,
                                                                 os.urandom(8).hex()])
        self._known.forget_owed(tenant)  # the seed holds what this replica spent in an outage
        if int(seeded):
            log.info("Redis had no quota counts for tenant %r: reloaded from the ledger (%d tokens today, %d "
                     "this month)", tenant, day_used, month_used)
