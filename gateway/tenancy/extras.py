"""Which engine knobs outside OpenAI's spec a tenant may send.

Sampling extras (`top_k`, `min_p`, ...) are every tenant's; the privileged ones (scheduling priority,
guided decoding, custom chat templates, prompt logprobs, KV transfer, raw engine arguments) cost the
shared engines more than a request's tokens, so only tenants that list them in `engine_extras:` may.

Two standard fields reach the same engine work and need the same entry: completions' `echo` with
`logprobs` is logprobs over the whole prompt (vLLM turns it into `prompt_logprobs`), and
`response_format: {"type": "json_schema"}` compiles a client-chosen grammar (as `guided_json` does).
"""

from __future__ import annotations

from gateway.errors import GatewayError
from gateway.tenancy.tenants import Tenant
from gateway.wire.protocol import PRIVILEGED_EXTRAS, ChatCompletionRequest, CompletionRequest


def require_allowed_extras(request: ChatCompletionRequest | CompletionRequest, tenant: Tenant) -> None:
    _require_standard_fields_allowed(request, tenant)
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


def _require_standard_fields_allowed(request: ChatCompletionRequest | CompletionRequest, tenant: Tenant) -> None:
    if (getattr(request, "echo", None) and getattr(request, "logprobs", None) is not None
            and "prompt_logprobs" not in tenant.engine_extras):
        raise GatewayError(
            400, "'echo' with 'logprobs' computes logprobs over the whole prompt (the engine's prompt_logprobs), "
            "which is reserved for tenants that list `prompt_logprobs` under `engine_extras` in the gateway's "
            "tenants file; send one of them without the other.", param="echo", code="unsupported_parameter")
    response_format = getattr(request, "response_format", None)
    if (isinstance(response_format, dict) and response_format.get("type") == "json_schema"
            and "guided_json" not in tenant.engine_extras):
        raise GatewayError(
            400, "`response_format` of type 'json_schema' makes the shared engine compile a grammar from your "
            "schema, which is reserved for tenants that list `guided_json` under `engine_extras` in the "
            "gateway's tenants file; 'json_object' is open to every tenant.", param="response_format",
            code="unsupported_parameter")
