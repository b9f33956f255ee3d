"""Every backend of the registry as `OpenAIUpstream`s sharing one HTTP connection pool.

A `discovery: url` backend is one upstream, keyed by its backend id. A `discovery: dns` backend is one
upstream per address its host resolves to (`gateway.backends.discovery`), keyed `<backend id>@<address>`
and carrying a copy of the backend whose id and URL are the pod's: routing, caps, health and ejection
then apply per engine pod. Until its host was first resolved, the backend's own URL stands in.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from urllib.parse import urlsplit

import aiohttp

from gateway.backends.discovery import Addresses
from gateway.backends.timeouts import timeouts_for
from gateway.backends.upstream import OpenAIUpstream
from gateway.registry import Backend, Model, Registry
from gateway.settings import Settings


class Upstreams(Mapping[str, OpenAIUpstream]):
    """Upstream id -> upstream, for the registry's backends and the engine pods found right now."""

    def __init__(self, registry: Registry, client: aiohttp.ClientSession, settings: Settings,
                 addresses: Addresses | None = None) -> None:
        self.addresses = addresses or Addresses(None)
        self._client = client
        self._api_key = settings.engine_api_key
        self._named: dict[str, OpenAIUpstream] = {}  # by backend id, timeouts resolved once
        self._discovered: dict[str, str] = {}  # dns backend id -> its host
        self._pods: dict[tuple[str, str], OpenAIUpstream] = {}  # (backend id, address) -> upstream
        for model in registry.models.values():
            for backend in model.backends:
                self._named[backend.id] = OpenAIUpstream(backend, model.id, client,
                                                         timeouts_for(settings, backend, model.timeouts),
                                                         api_key=self._api_key)
                if backend.discovery == "dns":
                    self._discovered[backend.id] = urlsplit(backend.base_url).hostname or ""

    def hosts(self) -> set[str]:
        """The host names whose addresses this configuration needs."""
        return set(self._discovered.values())

    def endpoints(self, model: Model) -> list[Backend]:
        """The backends to route `model` to: each discovered engine pod as a backend of its own."""
        found: list[Backend] = []
        for backend in model.backends:
            addresses = self._addresses_of(backend.id)
            if addresses is None:
                found.append(backend)
            else:
                found.extend(self._pod(backend.id, address).backend for address in addresses)
        return found

    def _addresses_of(self, backend_id: str) -> tuple[str, ...] | None:
        host = self._discovered.get(backend_id)
        return None if host is None else self.addresses.of(host)

    def _pod(self, backend_id: str, address: str) -> OpenAIUpstream:
        upstream = self._pods.get((backend_id, address))
        if upstream is None:
            named = self._named[backend_id]
            parts = urlsplit(named.backend.base_url)
            host = f"[{address}]" if ":" in address else address
            pod = named.backend.model_copy(update={"id": f"{backend_id}@{address}",
                                                   "url": f"{parts.scheme}://{host}:{parts.port or 80}"})
            upstream = OpenAIUpstream(pod, named.model_id, self._client, named.timeouts, name=backend_id,
                                      address=address, api_key=self._api_key)
            self._pods[(backend_id, address)] = upstream
        return upstream

    def _current(self) -> list[OpenAIUpstream]:
        """Every upstream now; pods that left the DNS answer are forgotten here (a request holds its own
        reference to the upstream it is using, so it finishes undisturbed)."""
        current: list[OpenAIUpstream] = []
        for backend_id, upstream in self._named.items():
            addresses = self._addresses_of(backend_id)
            if addresses is None:
                current.append(upstream)
            else:
                current.extend(self._pod(backend_id, address) for address in addresses)
        if len(self._pods) > len(current):
            keep = {(u.name, u.address) for u in current}
            for key in self._pods.keys() - keep:
                del self._pods[key]
        return current

    def __getitem__(self, upstream_id: str) -> OpenAIUpstream:
        backend_id, _, address = upstream_id.partition("@")
        upstream = self._pods.get((backend_id, address)) if address else self._named.get(upstream_id)
        if upstream is None:
            raise KeyError(upstream_id)
        return upstream

    def __iter__(self) -> Iterator[str]:
        return (upstream.id for upstream in self._current())

    def __len__(self) -> int:
        return len(self._current())


def build_upstreams(registry: Registry, client: aiohttp.ClientSession, settings: Settings,
                    addresses: Addresses | None = None) -> Upstreams:
    """Backend ids are unique across the registry; a pod's id adds its address."""
    return Upstreams(registry, client, settings, addresses)
