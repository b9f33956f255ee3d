"""One consistent view of the configuration: registry, tenants and the upstreams built from them.

A request reads `GatewayState.snapshot` once and is judged against that snapshot to the end; a reload
builds a complete new snapshot and swaps it in with one assignment, or keeps the old one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp

from gateway.backends.pool import build_upstreams
from gateway.backends.upstream import OpenAIUpstream
from gateway.policy.decide import Decision, decide
from gateway.registry import Model, Registry, load_registry
from gateway.settings import Settings
from gateway.tenancy.tenants import Tenant, TenantDirectory, load_tenants


@dataclass(frozen=True)
class Snapshot:
    registry: Registry
    tenants: TenantDirectory | None  # None: open access
    upstreams: dict[str, OpenAIUpstream]
    _decisions: dict[tuple[str, str], Decision] = field(default_factory=dict, repr=False, compare=False)

    def decide(self, tenant: Tenant, model: Model) -> Decision:
        """The policy decision, computed once per (tenant, model) for this snapshot: O(1) per request."""
        key = (tenant.name, model.id)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._decisions[key] = decide(tenant, model, self.registry)
        return decision


def load_config(settings: Settings) -> tuple[Registry, TenantDirectory | None]:
    """Read and validate every config file; raises RegistryError or TenantsError."""
    registry = load_registry(settings.registry_paths)
    tenants = load_tenants(settings.tenants, registry) if settings.tenants else None
    return registry, tenants


def load_snapshot(settings: Settings, client: aiohttp.ClientSession) -> Snapshot:
    registry, tenants = load_config(settings)
    return Snapshot(registry, tenants, build_upstreams(registry, client, settings))
