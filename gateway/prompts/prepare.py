"""Turn a client request into the call the engine needs: which endpoint, what payload, what comes back.

Chat to a model whose engine template is right (`native_chat_template`) is forwarded as chat. Every
other chat is rendered here with the model's own prompt format and sent to the engine's
`/v1/completions`; the answer is translated back into chat shape (`Reply.CHAT_FROM_COMPLETION`).
Either way the format's stop strings are added to the request.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from gateway.errors import GatewayError
from gateway.prompts.formats import FORMATS
from gateway.prompts.messages import to_turns
from gateway.registry.schema import Model

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
# Chat-only fields a completions endpoint does not take (after their completions equivalents are set).
_CHAT_ONLY = ("messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
              "tool_choice", "parallel_tool_calls", "functions", "function_call")


class Reply(Enum):
    AS_IS = "as-is"  # the engine answers in the client's shape already
    CHAT_FROM_COMPLETION = "chat-from-completion"


@dataclass
class UpstreamCall:
    path: str
    payload: dict[str, Any]
    prompt_text: str | None  # the prompt as text when known (token counting, context check)
    reply: Reply = Reply.AS_IS

    @property
    def prompt_estimate(self) -> int:
        """Prompt tokens before the engine counts them (~4 characters per token), for reservations."""
        return len(self.prompt_text or "") // 4

    @property
    def max_tokens(self) -> int | None:
        return self.payload.get("max_tokens") or self.payload.get("max_completion_tokens")


def prepare_chat(model: Model, body: dict[str, Any]) -> UpstreamCall:
    if model.prompt_format == "none" and not model.allow_chat_without_format:
        raise GatewayError(
            400,
            f"`{model.id}` is a base model without a chat format; send plain text to /v1/completions.",
            param="model",
            code="chat_not_supported",
        )
    prompt_format = FORMATS[model.prompt_format]
    prompt = prompt_format.render(to_turns(body["messages"]), model.default_system_prompt)
    payload = _with_stops(model, body, prompt_format.stop)
    if model.native_chat_template:
        return UpstreamCall(CHAT_PATH, payload, prompt_text=prompt)
    return UpstreamCall(COMPLETIONS_PATH, _as_completion(payload, prompt), prompt_text=prompt,
                        reply=Reply.CHAT_FROM_COMPLETION)


def prepare_completion(model: Model, body: dict[str, Any]) -> UpstreamCall:
    prompt = body.get("prompt")
    return UpstreamCall(COMPLETIONS_PATH, body, prompt_text=prompt if isinstance(prompt, str) else None)


def _with_stops(model: Model, body: dict[str, Any], format_stops: tuple[str, ...]) -> dict[str, Any]:
    stop = body.get("stop")
    client_stops = [stop] if isinstance(stop, str) else list(stop or ())
    payload = dict(body)
    payload["stop"] = client_stops + [s for s in format_stops if s not in client_stops]
    if model.stop_token_ids:
        payload["stop_token_ids"] = list(dict.fromkeys([*body.get("stop_token_ids", ()), *model.stop_token_ids]))
    return payload


def _as_completion(payload: dict[str, Any], prompt: str) -> dict[str, Any]:
    if payload.get("tools") or payload.get("functions"):
        raise GatewayError(400, "This model's prompt format cannot express tools.", param="tools",
                           code="unsupported_parameter")
    completion = {key: value for key, value in payload.items() if key not in _CHAT_ONLY}
    completion["prompt"] = prompt
    # Chat without a limit means "until the context is full"; completions endpoints default to 16
    # tokens instead, so say explicitly that there is no limit (vLLM and llama.cpp read null so).
    completion["max_tokens"] = payload.get("max_tokens") or payload.get("max_completion_tokens")
    if payload.get("logprobs"):  # chat's bool + top_logprobs -> completions' int
        completion["logprobs"] = payload.get("top_logprobs") or 1
    else:
        completion.pop("logprobs", None)
    return completion
