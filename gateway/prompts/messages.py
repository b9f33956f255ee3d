"""OpenAI chat messages reduced to what a 2023 prompt format can express: system, user, assistant turns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.errors import GatewayError
from gateway.wire.protocol import ChatMessage, ContentPart

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Turn:
    role: Role
    content: str


def to_turns(messages: Sequence[ChatMessage]) -> list[Turn]:
    """Map messages to turns (text parts joined), or raise a 400 naming the first message no model here
    can take: tool and function roles or calls, images, audio and files."""
    turns = []
    for index, message in enumerate(messages):
        role = message.role
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise _inexpressible(index, f"role '{role}' (tool and function calls)", "role")
        if message.tool_calls or message.function_call:
            raise _inexpressible(index, "tool calls", "tool_calls")
        turns.append(Turn(role, _text_of(index, message.content)))
    return turns


def refuse_control_strings(turns: Sequence[Turn], controls: Sequence[str]) -> None:
    """A 400 naming the first message whose text contains one of the format's control strings.

    Turn markers and special tokens in user text would let a client forge turns (a system turn inside
    a user message) once the prompt is rendered or the engine's template applied. The formats have no
    escape syntax, and silently changing a client's text is worse than saying no. A control written
    with a leading newline ("\\nUser:") only counts at the start of a line.
    """
    for index, turn in enumerate(turns):
        text = "\n" + turn.content
        for control in controls:
            if control in text:
                shown = control.lstrip("\n")
                raise GatewayError(
                    400,
                    f"messages[{index}]: the content contains '{shown}', a control sequence of this model's "
                    "prompt format; remove it (turn markers and special tokens cannot appear in message text).",
                    param=f"messages[{index}].content",
                    code="invalid_value",
                )


def _text_of(index: int, content: str | list[ContentPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.type == "text":
            parts.append(part.text or "")
        elif part.type == "refusal":  # an assistant turn that refused: its words are the turn's text
            parts.append(part.refusal or "")
        else:
            raise _inexpressible(index, f"content of type '{part.type}'", "content")
    return "".join(parts)


def _inexpressible(index: int, what: str, field: str) -> GatewayError:
    return GatewayError(
        400,
        f"messages[{index}]: this model's prompt format cannot express {what}.",
        param=f"messages[{index}].{field}",
        code="unsupported_message",
    )


def split_system(turns: list[Turn]) -> tuple[str | None, list[Turn]]:
    """Leading system turns joined into one system prompt, and the rest.

    A system message after the conversation started has no place in any of these formats; it is
    rejected rather than silently moved.
    """
    system_parts = []
    rest_start = 0
    for rest_start, turn in enumerate(turns):
        if turn.role != "system":
            break
        system_parts.append(turn.content)
    else:
        rest_start = len(turns)
    rest = turns[rest_start:]
    for offset, turn in enumerate(rest):
        if turn.role == "system":
            index = rest_start + offset
            raise GatewayError(
                400,
                f"messages[{index}]: a system message is only allowed at the start of the conversation "
                "for this model's prompt format.",
                param=f"messages[{index}].role",
                code="unsupported_message",
            )
    system = "\n".join(system_parts) if system_parts else None
    return system, rest


def require_alternation(turns: list[Turn], offset: int) -> None:
    """user, assistant, user, ... ending with user: the shape every 2023 chat format was trained on."""
    for position, turn in enumerate(turns):
        expected = "user" if position % 2 == 0 else "assistant"
        if turn.role != expected:
            index = offset + position
            raise GatewayError(
                400,
                f"messages[{index}]: expected a '{expected}' message here; this model's prompt format "
                "needs user and assistant messages to alternate, starting and ending with 'user'.",
                param=f"messages[{index}].role",
                code="unsupported_message",
            )
    if not turns or turns[-1].role != "user":
        index = offset + len(turns) - 1
        raise GatewayError(400, "The last message must come from the user.",
                           param=f"messages[{max(index, 0)}].role", code="unsupported_message")
