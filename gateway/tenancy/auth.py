"""Who is calling. Until tenants exist ([3/5]) every bearer token is accepted as one anonymous tenant."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gateway.errors import GatewayError

log = logging.getLogger("gateway.tenancy")


@dataclass(frozen=True)
class Tenant:
    name: str
    environment: str


ANONYMOUS = Tenant(name="anonymous", environment="development")


def warn_open_access() -> None:
    log.warning(
        "AUTHENTICATION IS OFF: any bearer token is accepted and every caller is the anonymous "
        "development tenant. Do not expose this gateway beyond localhost until tenants are configured."
    )


def authenticate(authorization: str | None) -> Tenant:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise GatewayError(
            401,
            "You didn't provide an API key. Provide it in the Authorization header as "
            "'Authorization: Bearer YOUR_KEY'.",
            code="invalid_api_key",
        )
    return ANONYMOUS
