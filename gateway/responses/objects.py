"""OpenAI's Response object and its parts, as the plain dicts that are sent and stored.

The request's settings are echoed back as OpenAI does (its defaults where the request set none), so
the SDKs' typed `Response` reads the same fields it reads from OpenAI.
"""

from __future__ import annotations

import time
from typing import Any

from gateway.wire.responses import ResponsesRequest

INCOMPLETE = "incomplete"


def skeleton(request: ResponsesRequest, response_id: str, created_at: int, store: bool) -> dict[str, Any]:
    """The response before its output: what `response.created` carries, and the base of the final one."""
    fmt = request.text.format if request.text is not None else None
    base = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": False,
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "max_tool_calls": request.max_tool_calls,
        "model": request.model,
        "output": [],
        "parallel_tool_calls": True if request.parallel_tool_calls is None else request.parallel_tool_calls,
        "previous_response_id": request.previous_response_id,
        "prompt_cache_key": request.prompt_cache_key,
        "reasoning": _NO_REASONING,
        "safety_identifier": request.safety_identifier,
        "service_tier": "default",
        "store": store,
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "text": _PLAIN_TEXT if fmt is None else {"format": _format(fmt), "verbosity": "medium"},
        "tool_choice": request.tool_choice if isinstance(request.tool_choice, str) else "auto",
        "tools": _NO_TOOLS,
        "top_logprobs": 0,
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "truncation": request.truncation or "disabled",
        "metadata": request.metadata or {},
    }
    if request.user is not None:  # a string in the spec, never null (as `usage`: set once known)
        base["user"] = request.user
    return base


# Shared by every response (never mutated): the same values OpenAI echoes for a request that sets none.
_NO_REASONING: dict[str, Any] = {"effort": None, "summary": None}
_PLAIN_TEXT: dict[str, Any] = {"format": {"type": "text"}, "verbosity": "medium"}
_NO_TOOLS: list[Any] = []


def _format(fmt: Any) -> dict[str, Any]:
    if fmt is None or fmt.type != "json_schema":
        return {"type": "text" if fmt is None else fmt.type}
    echoed = {"type": "json_schema", "name": fmt.name, "schema": fmt.json_schema,
              "strict": bool(fmt.strict)}
    if fmt.description is not None:
        echoed["description"] = fmt.description
    return echoed


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def usage(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat's usage in Responses' terms."""
    if not isinstance(chat_usage, dict):
        return None
    prompt = _count(chat_usage.get("prompt_tokens"))
    completion = _count(chat_usage.get("completion_tokens"))
    details = chat_usage.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def finished(base: dict[str, Any], item_id: str, text: str, finish_reason: str | None,
             chat_usage: dict[str, Any] | None) -> dict[str, Any]:
    """The final response: `completed`, or `incomplete` when the length limit stopped the model."""
    stopped = finish_reason == "length"
    status = INCOMPLETE if stopped else "completed"
    final = {
        **base,
        "status": status,
        "completed_at": None if stopped else int(time.time()),
        "incomplete_details": {"reason": "max_output_tokens"} if stopped else None,
        "output": [message_item(item_id, status, [text_part(text)])],
    }
    counted = usage(chat_usage)
    if counted is not None:
        final["usage"] = counted
    return final


def failed(base: dict[str, Any], item_id: str, text: str, code: str, message: str) -> dict[str, Any]:
    """A response the engine broke off after it started: what was generated, and why it ended."""
    output = [message_item(item_id, INCOMPLETE, [text_part(text)])] if text else []
    return {**base, "status": "failed", "error": {"code": code, "message": message}, "output": output}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0
