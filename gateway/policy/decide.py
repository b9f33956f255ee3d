"""May this tenant use this model? [3/5] puts the license rules here; until then every call is allowed."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.registry.schema import Model
from gateway.tenancy.auth import Tenant


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str
    reason: str


def decide(tenant: Tenant, model: Model) -> Decision:
    return Decision(allowed=True, rule="open-access", reason="no tenant policy configured yet")
