"""Chat's errors in a Responses client's terms: `messages[3]` becomes the input item (or the instructions,
or the stored conversation) it came from, chat's parameter names become the Responses ones."""

from __future__ import annotations

import re

from gateway.errors import GatewayError
from gateway.responses.request import HISTORY, Turn

_MESSAGE = re.compile(r"messages\[(\d+)\]")
_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
           "response_format": "text.format"}
_WORDS = (
    ("'response_format'", "'text.format'"),
    ("response_format is not supported", "structured output (text.format) is not supported"),
    ("'max_tokens'", "'max_output_tokens'"),
    ("in the messages", "in the input and the conversation before it"),
    ("Please reduce the length of the messages or completion.",
     "Please shorten the input or lower max_output_tokens, or set truncation to 'auto'."),
    ("The last message must come from the user.", "The last input item must come from the user."),
)


def as_responses_error(exc: GatewayError, turn: Turn) -> GatewayError:
    origins = turn.origins

    def origin(index: int) -> str:
        return origins[index] if index < len(origins) else "input"

    param = exc.param
    if param:
        match = _MESSAGE.match(param)
        if match:
            where = origin(int(match.group(1)))
            param = where + param[match.end():] if where.startswith("input[") else where
        else:
            head, dot, tail = param.partition(".")
            param = _PARAMS.get(head, head) + dot + tail
    message = _MESSAGE.sub(lambda m: _label(origin(int(m.group(1)))), exc.message)
    for old, new in _WORDS:
        if old in message:
            message = message.replace(old, new)
    return GatewayError(exc.status, message, type=exc.type, param=param, code=exc.code, headers=exc.headers)


def _label(origin: str) -> str:
    return "an earlier turn of the conversation (previous_response_id)" if origin == HISTORY else origin


def store_unavailable() -> GatewayError:
    return GatewayError(503, "The response store is unavailable right now; retry shortly, or send store: false "
                        "without previous_response_id.", type="service_unavailable_error", code="store_unavailable",
                        headers={"Retry-After": "1"})
