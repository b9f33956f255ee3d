"""A tenant's open requests on this replica, counted from the moment the tenant is identified.

The rate limiter counts a request against `max_concurrent` only once its body has arrived and it is
admitted; until then a slow upload held a connection slot for free, and one key with `max_concurrent: 4`
could hold every connection of a replica with slow bodies. Here each identified request takes a hold
(uploading, then in flight, until its outcome is reported), and a tenant at its `max_concurrent` on this
replica is refused before its body is read. The limiter still decides exactly across replicas; this
bounds what one replica lets a tenant hold.
"""

from __future__ import annotations

from gateway.errors import GatewayError

HOLD_RETRY_S = 1  # holds free when requests finish, which no clock predicts


class Hold:
    __slots__ = ("_holds", "_tenant", "_open")

    def __init__(self, holds: "Holds", tenant: str) -> None:
        self._holds = holds
        self._tenant = tenant
        self._open = True

    def release(self, _: object = None) -> None:
        """Idempotent; usable as an Outcome callback."""
        if self._open:
            self._open = False
            self._holds.release(self._tenant)


class Holds:
    def __init__(self) -> None:
        self._open: dict[str, int] = {}

    def take(self, tenant: str, limit: int | None) -> Hold | None:
        """A hold for one request of `tenant` (its `max_concurrent` is `limit`), or the 429 (and the
        connection closed: a refused upload must not keep its socket). None without a limit: nothing to count."""
        if limit is None:
            return None
        held = self._open.get(tenant, 0)
        if held >= limit:
            raise GatewayError(
                429, f"Rate limit reached for concurrent requests (limit {limit}, counting requests still "
                f"uploading their body). Retry in {HOLD_RETRY_S}s.", type="rate_limit_error",
                code="rate_limit_exceeded", headers={"Retry-After": str(HOLD_RETRY_S), "Connection": "close"})
        self._open[tenant] = held + 1
        return Hold(self, tenant)

    def release(self, tenant: str) -> None:
        held = self._open.get(tenant, 0) - 1
        if held > 0:
            self._open[tenant] = held
        else:
            self._open.pop(tenant, None)

    def held(self, tenant: str) -> int:
        return self._open.get(tenant, 0)
