"""Engine pods behind one name: the addresses a backend's host resolves to, refreshed.

A backend with `discovery: dns` names a headless Kubernetes Service: its DNS name answers with one A
record per ready pod (a pod that is terminating or failing its readiness probe drops out of the answer).
Each address becomes an upstream of its own (`gateway.backends.pool`), so least-load picking, prefix
affinity, concurrency caps, health probes and ejection see engine processes, not a Service that
kube-proxy spreads at random. No Kubernetes API token is needed, only cluster DNS.

The lookups go through c-ares (aiodns): no thread, nothing blocks the event loop. A failed lookup (a DNS
server down, a timeout) keeps the last known addresses: a DNS outage must not take every engine out of
routing. A name that resolves to nothing (NXDOMAIN, or no record: no pod is ready) has no addresses.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence

import aiodns
from aiodns.error import DNSError
from pycares.errno import ARES_ENODATA, ARES_ENONAME, ARES_ENOTFOUND

log = logging.getLogger("gateway.discovery")

Resolve = Callable[[str], Awaitable[tuple[str, ...]]]  # host -> its addresses (sorted); may raise
_NO_SUCH_NAME = (ARES_ENOTFOUND, ARES_ENODATA, ARES_ENONAME)
_LOOKUP_TIMEOUT_S = 2.0


class NoAddresses(Exception):
    """The name exists nowhere, or has no address record: nothing to route to."""


def dns_resolver(nameservers: Sequence[str] = ()) -> Resolve:
    """Lookups through c-ares with the system's resolv.conf (search domains, /etc/hosts), or through the
    given name servers ("ip" or "ip:port"). Create it inside the running event loop."""
    resolver = aiodns.DNSResolver(nameservers=list(nameservers) or None, timeout=_LOOKUP_TIMEOUT_S)

    async def resolve(host: str) -> tuple[str, ...]:
        try:
            result = await resolver.getaddrinfo(host, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM)
        except DNSError as exc:
            if exc.args and exc.args[0] in _NO_SUCH_NAME:
                raise NoAddresses(host) from None
            raise
        addresses = sorted({_text(node.addr[0]) for node in result.nodes})
        if not addresses:
            raise NoAddresses(host)
        return tuple(addresses)

    return resolve


def _text(address: str | bytes) -> str:
    return address.decode("ascii") if isinstance(address, bytes) else address


class Addresses:
    """The last known addresses of each discovered host, shared by every configuration snapshot (a
    reload keeps them). `run` refreshes the hosts the current snapshot needs every `refresh_s`."""

    def __init__(self, resolve: Resolve | None, refresh_s: float = 5.0) -> None:
        self._resolve = resolve
        self._refresh_s = refresh_s
        self._known: dict[str, tuple[str, ...]] = {}
        self._failing: set[str] = set()

    def of(self, host: str) -> tuple[str, ...] | None:
        """The host's addresses; None while it was never resolved (then the name itself is the upstream)."""
        return self._known.get(host)

    async def refresh(self, hosts: Iterable[str]) -> None:
        """Resolve every host once, concurrently; each failure is logged once until it recovers."""
        if self._resolve is None:
            return
        wanted = sorted(set(hosts))
        results = await asyncio.gather(*(self._resolve(host) for host in wanted), return_exceptions=True)
        for host, result in zip(wanted, results):
            if isinstance(result, NoAddresses):
                result = ()
            if isinstance(result, BaseException):
                if host not in self._failing:
                    log.warning("cannot resolve %s (%s); keeping its last known addresses %s", host,
                                type(result).__name__, list(self._known.get(host, ())))
                self._failing.add(host)
                continue
            self._failing.discard(host)
            before = self._known.get(host)
            if before != result:
                log.info("%s: %d engine address(es): %s", host, len(result), ", ".join(result) or "none")
            self._known[host] = result
        for gone in self._known.keys() - set(wanted):  # a reload dropped the backend
            del self._known[gone]

    async def run(self, hosts: Callable[[], Iterable[str]]) -> None:
        while True:
            try:
                await self.refresh(hosts())
            except Exception:  # a refresh must never end the loop
                log.exception("address refresh failed")
            await asyncio.sleep(self._refresh_s)
