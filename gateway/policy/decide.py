"""May this tenant use this model? A pure function of (tenant, registry entry, license table).

Rules, in order (each decision names the rule that made it):
1. `private-model` / `tenant-deny-list` / `tenant-allow-list`: the tenant's own lists, or a model kept
   for other tenants. Such a model is invisible: the caller gets the same 404 as for a missing model.
2. `commercial-license`: a commercially usable license is allowed everywhere.
3. `conditional-license-attested` / `conditional-license-unattested`: in production and staging a
   conditional license (Llama 2, Falcon-180B's "no hosting use") needs every condition attested.
4. `non-commercial-license-non-production` / `non-commercial-license-in-production`: non-commercial
   licenses are allowed only in development and research.
5. `substitute-commercial-twin`: a license denial becomes a substitution when the model names a
   commercially usable twin, the tenant opted in, and the twin itself is allowed (never chained).

A non-commercial denial names the twin as an alternative only when this tenant may see and call it:
a twin hidden by the tenant's lists or `private_to`, or refused by the license rules, is not named.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from gateway.registry import CommercialUse, Model, Registry
from gateway.tenancy.tenants import Environment, Tenant

_PRODUCTION_LIKE = {Environment.PRODUCTION, Environment.STAGING}


class Verdict(str, Enum):
    ALLOW = "allow"
    DENY = "deny"
    SUBSTITUTE = "substitute"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    rule: str
    reason: str
    served_model: str | None = None  # the model actually served (the twin when substituted)
    hidden: bool = False  # deny as "not found": the tenant may not even know the model exists

    @property
    def allowed(self) -> bool:
        return self.verdict is not Verdict.DENY


def decide(tenant: Tenant, model: Model, registry: Registry) -> Decision:
    decision = _by_lists(tenant, model) or _by_license(tenant, model, registry)
    if decision.verdict is Verdict.DENY and not decision.hidden:
        return _substitute(tenant, model, registry) or decision
    return decision


def _by_lists(tenant: Tenant, model: Model) -> Decision | None:
    if model.private_to and tenant.name not in model.private_to:
        rule, why = "private-model", f"`{model.id}` is private to other tenants"
    elif tenant.denies(model.id):
        rule, why = "tenant-deny-list", f"tenant '{tenant.name}' denies `{model.id}`"
    elif not tenant.allows(model.id):
        rule, why = "tenant-allow-list", f"`{model.id}` is not on the allow list of tenant '{tenant.name}'"
    else:
        return None
    return Decision(Verdict.DENY, rule, why, hidden=True)


def _by_license(tenant: Tenant, model: Model, registry: Registry, hint: bool = True) -> Decision:
    license_ = registry.license_of(model)
    env = tenant.environment.value
    # The registry's license names often end in their own abbreviation ("... (CC BY-NC 4.0)"): the id
    # goes first, so that a message never reads "(CC BY-NC 4.0) (cc-by-nc-4.0)".
    named = f"`{model.id}` is under `{model.license}`, the {license_.name}"
    if license_.commercial_use is CommercialUse.YES:
        return Decision(Verdict.ALLOW, "commercial-license", f"{named}, which allows commercial use",
                        served_model=model.id)
    if license_.commercial_use is CommercialUse.CONDITIONAL:
        if tenant.environment not in _PRODUCTION_LIKE:
            return Decision(Verdict.ALLOW, "conditional-license-non-production",
                            f"{named}; its commercial conditions bind {env} use only once it ships",
                            served_model=model.id)
        missing = [c.id for c in license_.conditions if c.id not in tenant.attestations]
        if not missing:
            return Decision(Verdict.ALLOW, "conditional-license-attested",
                            f"{named}; tenant '{tenant.name}' attested every condition", served_model=model.id)
        return Decision(
            Verdict.DENY, "conditional-license-unattested",
            f"{named}, which allows commercial use only under conditions. Tenant '{tenant.name}' "
            f"({env}) has not attested: {', '.join(missing)}. It is permitted once the tenant's "
            "attestations list those conditions, or from a development or research tenant.")
    if tenant.environment not in _PRODUCTION_LIKE:
        return Decision(Verdict.ALLOW, "non-commercial-license-non-production",
                        f"{named}, a non-commercial license; allowed in {env}", served_model=model.id)
    return Decision(
        Verdict.DENY, "non-commercial-license-in-production",
        f"{named}, which forbids commercial use, and tenant '{tenant.name}' is a {env} tenant. It is "
        "permitted only from a development or research tenant"
        + (_twin_hint(tenant, model, registry) if hint else "") + ".")


def _twin_hint(tenant: Tenant, model: Model, registry: Registry) -> str:
    """Name the twin only if this tenant may see and call it: never reveal a model hidden from it."""
    twin = registry.model(model.commercial_twin) if model.commercial_twin else None
    if twin is None or _twin_decision(tenant, twin, registry).verdict is not Verdict.ALLOW:
        return ""
    # Only a tenant that has not opted in reads this: one that has is served the twin instead.
    return f"; `{twin.id}` is a commercially usable alternative (a tenant with `substitutions: true` is served it)"


def _twin_decision(tenant: Tenant, twin: Model, registry: Registry) -> Decision:
    """The twin judged on its own: lists first (hidden), then its license, never substituted further."""
    return _by_lists(tenant, twin) or _by_license(tenant, twin, registry, hint=False)


def _substitute(tenant: Tenant, model: Model, registry: Registry) -> Decision | None:
    twin = registry.model(model.commercial_twin) if model.commercial_twin else None
    if twin is None or not tenant.substitutions:
        return None
    twin_decision = _twin_decision(tenant, twin, registry)
    if twin_decision.verdict is not Verdict.ALLOW:
        return None  # never chain into another forbidden model
    why = _by_license(tenant, model, registry, hint=False).reason  # the denial, without the opt-in hint
    return Decision(Verdict.SUBSTITUTE, "substitute-commercial-twin",
                    f"{why} Substituted `{twin.id}` ({twin_decision.rule}).", served_model=twin.id)
