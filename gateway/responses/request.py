"""A Responses request -> the chat request the pipeline serves, and this turn's input items for the store.

The conversation is `instructions` (a system message: a previous response's instructions are not carried
over, as OpenAI's), then the stored chain's items oldest first, then this request's `input`. The model's
own prompt format is applied to the whole of it by the pipeline, as to any chat. The turn remembers where
each chat message came from (`Turn.origins`), so that an error about `messages[3]` can name `input[1]`
(gateway.responses.errors).

What none of the ten families can do is refused here, before anything is admitted, with the parameter
and the reason in one sentence.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any

from gateway.errors import GatewayError
from gateway.wire.protocol import SAMPLING_EXTRAS, ChatCompletionRequest
from gateway.wire.responses import ContentPart, InputItem, ResponsesRequest

HISTORY = "previous_response_id"  # the origin of every message taken from the stored chain

_NO_TOOLS = "none of the ten model families this gateway serves was trained to call tools"
_TEXT_ONLY = "the models this gateway serves read text only"
_TEXT_PARTS = {"input_text", "output_text", "text"}
_MEDIA_PARTS = {"input_image": "images", "input_file": "files", "input_audio": "audio"}
_ITEM_REASONS = {
    "function_call": _NO_TOOLS, "function_call_output": _NO_TOOLS, "custom_tool_call": _NO_TOOLS,
    "custom_tool_call_output": _NO_TOOLS,
    "reasoning": "none of the models this gateway serves reasons in a separate channel",
    "item_reference": "items are not looked up by id here; send the item itself, or continue the conversation "
                      "with previous_response_id",
}
_TIERS = {"auto", "default"}


@dataclass
class Turn:
    # Validated like any chat, from the (validated) Responses fields: pydantic-core does it in ~5 µs, where
    # `model_construct` spends ~40 µs filling chat's 60 defaults in Python.
    chat: ChatCompletionRequest
    input_items: list[dict[str, Any]]  # this turn's input, each item with an id (OpenAI's input_items shape)
    origins: list[str]  # per chat message: "instructions", "input[2]", or HISTORY
    history: tuple[int, int]  # [start, end) of the chain's messages
    truncate: bool  # truncation "auto": the oldest history may be dropped


def new_id(prefix: str) -> str:
    """`resp_...`, `msg_...`: unique across replicas (a random part per process) without a system call per
    id. Guessing one gains nothing: every lookup is scoped to the tenant that made it."""
    return f"{prefix}{_PROCESS_ID}{next(_SEQUENCE):016x}"


def _new_process_id() -> None:
    global _PROCESS_ID, _SEQUENCE
    _PROCESS_ID, _SEQUENCE = os.urandom(16).hex(), itertools.count()


_PROCESS_ID, _SEQUENCE = "", itertools.count()
_new_process_id()
os.register_at_fork(after_in_child=_new_process_id)  # a forked worker must not repeat its parent's ids


def refuse_unsupported(request: ResponsesRequest) -> None:
    """A 400 naming the first parameter that asks for something no model here can do."""
    if request.tools:
        raise _unsupported("tools", f"{_NO_TOOLS}; send the request without tools")
    choice = request.tool_choice
    if choice is not None and choice not in ("auto", "none"):
        raise _unsupported("tool_choice", f"{_NO_TOOLS}, so no tool can be required or chosen")
    if request.reasoning and any(value is not None for value in request.reasoning.values()):
        raise _unsupported("reasoning", "none of the models this gateway serves was trained to reason before "
                                        "answering; leave reasoning unset")
    if request.background:
        raise _unsupported("background", "the gateway generates a response while its client waits; stream long "
                                         "answers instead of running them in the background")
    for value in request.include or ():
        why = ("logprobs are not returned on /v1/responses here; use /v1/chat/completions with logprobs"
               if value == "message.output_text.logprobs" else
               f"'{value}' is output of tools, images or reasoning, which the models here do not produce")
        raise _unsupported("include", why)
    if request.top_logprobs:
        raise _unsupported("top_logprobs", "logprobs are not returned on /v1/responses here; use "
                                           "/v1/chat/completions with logprobs")
    if request.service_tier is not None and request.service_tier not in _TIERS:
        raise _unsupported("service_tier", "the engines here have one service tier; send 'auto' or 'default'")
    if request.conversation is not None:
        raise _unsupported("conversation", "the Conversations API is not served here; continue a conversation "
                                           "with previous_response_id")
    if request.prompt is not None:
        raise _unsupported("prompt", "stored prompt templates are not served here; send input and instructions")
    if request.context_management is not None:
        raise _unsupported("context_management", "server-side compaction is not supported; set truncation to "
                                                 "'auto' to drop the oldest turns instead")
    if request.moderation is not None:
        raise _unsupported("moderation", "moderation is not supported by the models this gateway serves")
    if request.text is not None and request.text.verbosity is not None:
        raise _unsupported("text.verbosity", "verbosity is not supported by the models this gateway serves")
    fmt = request.text.format if request.text is not None else None
    if fmt is not None and fmt.type == "json_schema":
        for name, value in (("name", fmt.name), ("schema", fmt.json_schema)):
            if value is None:
                raise GatewayError(400, f"Missing required parameter: 'text.format.{name}'.",
                                   param=f"text.format.{name}", code="missing_required_parameter")


def to_turn(request: ResponsesRequest, history: list[dict[str, Any]]) -> Turn:
    """`history`: the chain's items, oldest first (input items and assistant output messages)."""
    messages: list[dict[str, str]] = []
    origins: list[str] = []
    if request.instructions is not None:
        messages.append(_message("system", request.instructions))
        origins.append("instructions")
    start = len(messages)
    for item in history:
        messages.append(_message(item["role"], _stored_text(item)))
        origins.append(HISTORY)
    end = len(messages)
    items = []
    if isinstance(request.input, str):
        messages.append(_message("user", request.input))
        origins.append("input")
        items.append({"id": new_id("msg_"), "type": "message", "role": "user", "status": "completed",
                      "content": [{"type": "input_text", "text": request.input}]})
    else:
        for index, item in enumerate(request.input):
            role, parts = _read_item(index, item)
            messages.append(_message(role, "".join(_part_text(part) for part in parts)))
            origins.append(f"input[{index}]")
            items.append(_stored_item(role, item.id, parts))
    chat = ChatCompletionRequest.model_validate({"model": request.model, "messages": messages,
                                                 **_chat_fields(request)})
    return Turn(chat, items, origins, (start, end), request.truncation == "auto")


def _chat_fields(request: ResponsesRequest) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in ("temperature", "top_p", "user"):
        if getattr(request, name) is not None:
            fields[name] = getattr(request, name)
    if request.max_output_tokens is not None:
        fields["max_tokens"] = request.max_output_tokens
    if request.stream:
        fields["stream"] = True
        # The completed event carries usage: the stream's usage chunk is always asked for (and the gateway
        # counts it where the engine sends none).
        fields["stream_options"] = {"include_usage": True}
    response_format = _response_format(request)
    if response_format is not None:
        fields["response_format"] = response_format
    for name in request.model_fields_set & SAMPLING_EXTRAS:
        if getattr(request, name) is not None:
            fields[name] = getattr(request, name)
    return fields


def _response_format(request: ResponsesRequest) -> dict[str, Any] | None:
    fmt = request.text.format if request.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    schema: dict[str, Any] = {"name": fmt.name, "schema": fmt.json_schema}
    if fmt.strict is not None:
        schema["strict"] = fmt.strict
    if fmt.description is not None:
        schema["description"] = fmt.description
    return {"type": "json_schema", "json_schema": schema}


def _read_item(index: int, item: InputItem) -> tuple[str, list[ContentPart]]:
    kind = item.type or "message"
    if kind != "message":
        why = _ITEM_REASONS.get(kind, f"items of type '{kind}' come from tools, which {_NO_TOOLS}")
        raise _unsupported(f"input[{index}].type", why)
    if item.role is None:
        raise GatewayError(400, f"Missing required parameter: 'input[{index}].role'.", param=f"input[{index}].role",
                           code="missing_required_parameter")
    if item.content is None:
        raise GatewayError(400, f"Missing required parameter: 'input[{index}].content'.",
                           param=f"input[{index}].content", code="missing_required_parameter")
    if isinstance(item.content, str):
        return item.role, [ContentPart(type="output_text" if item.role == "assistant" else "input_text",
                                       text=item.content)]
    for position, part in enumerate(item.content):
        param = f"input[{index}].content[{position}]"
        if part.type in _MEDIA_PARTS:
            raise _unsupported(f"{param}.type", f"{_TEXT_ONLY}, not {_MEDIA_PARTS[part.type]}")
        if part.type == "refusal":
            if part.refusal is None:
                raise GatewayError(400, f"Missing required parameter: '{param}.refusal'.", param=f"{param}.refusal",
                                   code="missing_required_parameter")
        elif part.type not in _TEXT_PARTS:
            raise _unsupported(f"{param}.type", f"{_TEXT_ONLY}; content parts are input_text or output_text")
        elif part.text is None:
            raise GatewayError(400, f"Missing required parameter: '{param}.text'.", param=f"{param}.text",
                               code="missing_required_parameter")
    return item.role, list(item.content)


def _part_text(part: ContentPart) -> str:
    return (part.refusal if part.type == "refusal" else part.text) or ""


def _stored_item(role: str, item_id: str | None, parts: list[ContentPart]) -> dict[str, Any]:
    """OpenAI's input_items shape: an input message, or an assistant output message sent back."""
    content: list[dict[str, Any]] = []
    for part in parts:
        if part.type == "refusal":
            content.append({"type": "refusal", "refusal": part.refusal})
        elif role == "assistant":
            content.append({"type": "output_text", "text": part.text, "annotations": [], "logprobs": []})
        else:
            content.append({"type": "input_text", "text": part.text})
    return {"id": item_id or new_id("msg_"), "type": "message", "role": role, "status": "completed",
            "content": content}


def _stored_text(item: dict[str, Any]) -> str:
    return "".join((part.get("refusal") if part.get("type") == "refusal" else part.get("text")) or ""
                   for part in item.get("content") or ())


def _message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _unsupported(param: str, why: str) -> GatewayError:
    return GatewayError(400, f"Unsupported parameter '{param}': {why}.", param=param, code="unsupported_parameter")
