"""Who is calling: the bearer key, looked up by its hash in the tenants directory.

Without a tenants file the gateway runs in open access: every bearer token is one anonymous
development tenant, and start-up logs a loud warning saying so.
"""

from __future__ import annotations

import logging

from gateway.errors import GatewayError
from gateway.admission.ratelimit import Limits
from gateway.tenancy.tenants import Caller, Environment, Tenant, TenantDirectory

log = logging.getLogger("gateway.tenancy")

ANONYMOUS = Caller(
    Tenant(name="anonymous", environment=Environment.DEVELOPMENT, allow_models=(), deny_models=(),
           attestations=frozenset(), substitutions=False, admin=False, limits=Limits()),
    key_id="none",
)


def warn_open_access() -> None:
    log.warning(
        "AUTHENTICATION IS OFF: no tenants file (GATEWAY_TENANTS) is set, so any bearer token is "
        "accepted as one anonymous development tenant. Do not expose this gateway beyond localhost."
    )


def authenticate(authorization: str | None, tenants: TenantDirectory | None) -> Caller:
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise GatewayError(
            401,
            "You didn't provide an API key. Provide it in the Authorization header as "
            "'Authorization: Bearer YOUR_KEY'.",
            type="invalid_request_error",
            code="invalid_api_key",
        )
    if tenants is None:
        return ANONYMOUS
    caller = tenants.caller_for_key(token)
    if caller is None:
        raise invalid_api_key()
    return caller


def invalid_api_key() -> GatewayError:
    # Never echo the key, not even masked: it may be a real key of another system.
    return GatewayError(401, "Incorrect API key provided.", type="invalid_request_error", code="invalid_api_key")


def require_admin(caller: Caller) -> None:
    if not caller.tenant.admin:
        raise GatewayError(403, "This endpoint needs an admin key.", type="permission_error",
                           code="admin_required")
