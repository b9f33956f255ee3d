"""Who is calling: the bearer key, looked up by its hash in the tenants file's keys, then in the keys
kept in the database (`gateway keys create`, `POST /admin/keys`): both are dictionary lookups in memory,
no I/O. A database key belongs to a tenant of the tenants file; a key whose tenant the file no longer
has is refused like an unknown one (401), as is a revoked or expired one.

Without a tenants file the gateway runs in open access: every bearer token is one anonymous
development tenant, and start-up logs a loud warning saying so.
"""

from __future__ import annotations

import logging
from typing import Protocol

from gateway.admission.ratelimit import Limits
from gateway.errors import GatewayError
from gateway.tenancy.tenants import Caller, Environment, Tenant, TenantDirectory, hash_key

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


class DatabaseKey(Protocol):
    id: str
    tenant: str


class KeyLookup(Protocol):
    """The database's live keys in memory (gateway.store.keys.KeyStore)."""

    def lookup(self, key_hash: str) -> DatabaseKey | None: ...

    def touch(self, key_id: str) -> None: ...


def authenticate(authorization: str | None, tenants: TenantDirectory | None,
                 keys: KeyLookup | None = None) -> Caller:
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
    key_hash = hash_key(token)
    caller = tenants.by_key_hash.get(key_hash)
    if caller is not None:
        return caller
    if keys is not None:
        record = keys.lookup(key_hash)  # None: unknown, revoked, expired
        tenant = tenants.tenants.get(record.tenant) if record is not None else None
        if record is not None and tenant is not None:
            keys.touch(record.id)  # a set add; last_used_at is written in batches
            return Caller(tenant, record.id, key_hash, "database")
    raise invalid_api_key()


def invalid_api_key() -> GatewayError:
    # Never echo the key, not even masked: it may be a real key of another system.
    return GatewayError(401, "Incorrect API key provided.", type="invalid_request_error", code="invalid_api_key")


def require_admin(caller: Caller) -> None:
    if not caller.tenant.admin:
        raise GatewayError(403, "This endpoint needs an admin key.", type="permission_error",
                           code="admin_required")
