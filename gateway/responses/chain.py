"""The conversation before a turn, rebuilt from the stored chain that `previous_response_id` names.

Walked with `get()` from the newest response back, each link scoped to the tenant: another tenant's id,
an expired or a deleted one reads as missing (OpenAI's 404 `previous_response_not_found`, which never
tells "not yours" from "never existed"). The walk is bounded (`GATEWAY_RESPONSES_MAX_CHAIN`): past it, a
request with `truncation: "auto"` keeps the newest turns (it would drop the oldest anyway), any other is
refused.
"""

from __future__ import annotations

import logging
from typing import Any

from gateway.errors import GatewayError
from gateway.responses.errors import store_unavailable
from gateway.responses.store import ResponseStore, StoredResponse

log = logging.getLogger("gateway.responses")

_CONTINUED = ("completed", "incomplete")  # a failed turn's partial output is not part of the conversation


async def load_history(store: ResponseStore, tenant: str, response_id: str | None, max_chain: int,
                       truncating: bool) -> list[dict[str, Any]]:
    """Each stored turn's input items, then its answer, oldest turn first."""
    if response_id is None:
        return []
    turns: list[StoredResponse] = []
    current: str | None = response_id
    while current is not None:
        if len(turns) == max_chain:
            if truncating:
                break
            raise GatewayError(
                400, f"The conversation that '{response_id}' ends is longer than {max_chain} responses; start a "
                "new one with its last turns as input, or set truncation to 'auto'.",
                param="previous_response_id", code="conversation_too_long")
        try:
            stored = await store.get(tenant, current)
        except Exception:
            log.exception("reading stored response %s failed", current)
            raise store_unavailable() from None
        if stored is None:
            raise previous_response_not_found(response_id, current)
        turns.append(stored)
        current = stored.previous_response_id
    items: list[dict[str, Any]] = []
    for stored in reversed(turns):
        items.extend(stored.input_items)
        if stored.response.get("status") in _CONTINUED:
            items.extend(item for item in stored.response.get("output") or ()
                         if item.get("type") == "message" and item.get("role") == "assistant")
    return items


def previous_response_not_found(response_id: str, missing: str) -> GatewayError:
    if missing == response_id:
        message = f"Previous response with id '{response_id}' not found."
    else:
        message = (f"Previous response with id '{response_id}' continues '{missing}', which was not found "
                   "(expired or deleted).")
    return GatewayError(404, message, param="previous_response_id", code="previous_response_not_found")
