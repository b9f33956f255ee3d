"""Which engine knobs outside OpenAI's spec a tenant may send.

Sampling extras (`top_k`, `min_p`, ...) are every tenant's; the privileged ones (scheduling priority,
guided decoding, custom chat templates, prompt logprobs, KV transfer, raw engine arguments) cost the
shared engines more than a request's tokens, so only tenants that list them in `engine_extras:` may.
"""

from __future__ import annotations

from gateway.errors import GatewayError
from gateway.tenancy.tenants import Tenant
from gateway.wire.protocol import PRIVILEGED_EXTRAS, ChatCompletionRequest, CompletionRequest


def require_allowed_extras(request: ChatCompletionRequest | CompletionRequest, tenant: Tenant) -> None:
    extras = request.extras
    if not extras:
        return
    refused = sorted((extras & PRIVILEGED_EXTRAS) - tenant.engine_extras)
    if refused:
        raise GatewayError(
            400,
            f"The request argument '{refused[0]}' is not enabled for this API key (it is an engine extension "
            "reserved for tenants that list it under `engine_extras` in the gateway's tenants file).",
            param=refused[0],
            code="unknown_parameter",
        )
