"""One consistent view of the configuration: registry, tenants and the upstreams built from them.

A request reads `GatewayState.snapshot` once and is judged against that snapshot to the end; a reload
builds a complete new snapshot and swaps it in with one assignment, or keeps the old one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp

from gateway.backends.discovery import Addresses
from gateway.backends.pool import Upstreams, build_upstreams
from gateway.errors import GatewayError, model_not_deployed, model_not_found
from gateway.policy.decide import Decision, decide
from gateway.registry import Model, Registry, deployed_view, load_registry, read_deployed
from gateway.settings import Settings
from gateway.tenancy.auth import ANONYMOUS, invalid_api_key
from gateway.tenancy.tenants import Caller, Tenant, TenantDirectory, load_tenants


@dataclass(frozen=True)
class Snapshot:
    registry: Registry
    tenants: TenantDirectory | None  # None: open access
    upstreams: Upstreams
    _decisions: dict[tuple[str, str], Decision] = field(default_factory=dict, repr=False, compare=False)

    def decide(self, tenant: Tenant, model: Model) -> Decision:
        """The policy decision, computed once per (tenant, model) for this snapshot: O(1) per request.

        Cached only for this snapshot's own tenant objects: a decision made for a tenant of another
        snapshot (a reload between authentication and judgement) must never be served to later requests."""
        key = (tenant.name, model.id)
        decision = self._decisions.get(key)
        if decision is None:
            decision = decide(tenant, model, self.registry)
            if self.owns(tenant):
                self._decisions[key] = decision
        return decision

    def missing(self, model_id: str, tenant: Tenant) -> GatewayError:
        """The 404 for a model this gateway does not serve: one the registry has but this deployment does
        not run says so, unless the tenant may not even know it exists (its lists, `private_to`)."""
        model = self.registry.undeployed.get(model_id)
        if model is not None and not decide(tenant, model, self.registry).hidden:
            return model_not_deployed(model_id)
        return model_not_found(model_id)

    def owns(self, tenant: Tenant) -> bool:
        return self.tenants is None or self.tenants.tenants.get(tenant.name) is tenant

    def current(self, caller: Caller) -> Caller:
        """The caller as this snapshot knows it: the same object when it was authenticated against this
        snapshot, else looked up again by its key (a reload between the headers and the body), or, for a
        database key, by its tenant's name. A key (or tenant) that the reload removed is refused (401), and
        a tenant it changed is judged by its new rules."""
        tenants = self.tenants
        if tenants is None:
            return caller if not caller.key_hash else ANONYMOUS
        if caller.source == "database":  # its tenant, as this snapshot has it
            tenant = tenants.tenants.get(caller.tenant.name)
            if tenant is caller.tenant:
                return caller
            found = Caller(tenant, caller.key_id, caller.key_hash, caller.source) if tenant is not None else None
        else:
            found = tenants.by_key_hash.get(caller.key_hash)
        if found is None:
            raise invalid_api_key()
        return found


def load_config(settings: Settings) -> tuple[Registry, TenantDirectory | None]:
    """Read and validate every config file; raises RegistryError or TenantsError. With a deployed file
    (GATEWAY_DEPLOYED), the registry is the deployed view; tenants are checked against the whole one."""
    registry = load_registry(settings.registry_paths)
    tenants = load_tenants(settings.tenants, registry) if settings.tenants else None
    if settings.deployed:
        registry = deployed_view(registry, read_deployed(settings.deployed, registry))
    return registry, tenants


def load_snapshot(settings: Settings, client: aiohttp.ClientSession, addresses: Addresses | None = None) -> Snapshot:
    registry, tenants = load_config(settings)
    return Snapshot(registry, tenants, build_upstreams(registry, client, settings, addresses))
