"""Turn a client request into the call the engine needs (which endpoint, what payload).

[1/5]: chat is forwarded to the engine's own chat endpoint; base models refuse chat. [2/5] adds one
renderer per prompt format and serves template-less models through the engine's /v1/completions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.errors import GatewayError
from gateway.registry.schema import Model

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


@dataclass
class UpstreamCall:
    path: str
    payload: dict[str, Any]
    # The prompt as text, when the gateway knows it (to count tokens for engines that don't).
    prompt_text: str | None


def prepare_chat(model: Model, body: dict[str, Any]) -> UpstreamCall:
    if model.prompt_format == "none" and not model.allow_chat_without_format:
        raise GatewayError(
            400,
            f"`{model.id}` is a base model without a chat format; send plain text to /v1/completions.",
            param="model",
            code="chat_not_supported",
        )
    return UpstreamCall(CHAT_PATH, body, prompt_text=_chat_text(body))


def prepare_completion(model: Model, body: dict[str, Any]) -> UpstreamCall:
    prompt = body.get("prompt")
    return UpstreamCall(COMPLETIONS_PATH, body, prompt_text=prompt if isinstance(prompt, str) else None)


def _chat_text(body: dict[str, Any]) -> str:
    """The messages' text with role markers: what an engine's template tokenizes, give or take a few."""
    parts = []
    for message in body.get("messages", ()):
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(part.get("text") or "" for part in content)
        parts.append(f"{message.get('role')}\n{content or ''}\n")
    return "".join(parts)
