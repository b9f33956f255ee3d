"""The OpenAI wire format as vLLM writes it: ids, objects, choices, usage, and SSE framing."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.errors import GatewayError
from gateway.workers.seq2seq_decode import Delta

DONE = b"data: [DONE]\n\n"


@dataclass
class Reply:
    """One request's response metadata, and per-choice state accumulated while deltas arrive."""

    chat: bool
    model: str
    rows: int
    prompt_tokens: int
    echo_texts: list[str] | None = None  # completions `echo`: the prompt text of each row
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    texts: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    finish: list[str | None] = field(default_factory=list)
    stop_reasons: list[str | int | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.texts = [""] * self.rows
        self.tokens = [0] * self.rows
        self.finish = [None] * self.rows
        self.stop_reasons = [None] * self.rows

    def add(self, delta: Delta) -> str:
        """Record one delta; returns the text to send for it (with the echoed prompt the first time)."""
        text = delta.text
        if self.echo_texts is not None and self.tokens[delta.row] == 0:
            text = self.echo_texts[delta.row] + text
        self.texts[delta.row] += text
        self.tokens[delta.row] += 1
        if delta.finish_reason is not None:
            self.finish[delta.row] = delta.finish_reason
            self.stop_reasons[delta.row] = delta.stop_reason
        return text

    def usage(self) -> dict[str, int]:
        completion = sum(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens + completion,
                "completion_tokens": completion}

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # -- non-streamed ---------------------------------------------------------------------------------

    def body(self) -> dict[str, Any]:
        choices = []
        for row in range(self.rows):
            choice: dict[str, Any] = {"index": row}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": self.texts[row], "refusal": None,
                                     "tool_calls": []}
            else:
                choice["text"] = self.texts[row]
            choice.update(logprobs=None, finish_reason=self.finish[row] or "length",
                          stop_reason=self.stop_reasons[row])
            choices.append(choice)
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": self.usage()}

    # -- streamed -------------------------------------------------------------------------------------

    def role_chunks(self) -> bytes:
        """Chat streams open every choice with the assistant role and empty content, as vLLM does."""
        return b"".join(
            _sse({**self._head("chat.completion.chunk"), "choices": [
                {"index": row, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}]})
            for row in range(self.rows))

    def chunks(self, deltas: list[Delta]) -> bytes:
        return b"".join(self._chunk(delta, self.add(delta)) for delta in deltas)

    def _chunk(self, delta: Delta, text: str) -> bytes:
        choice: dict[str, Any] = {"index": delta.row}
        if self.chat:
            choice["delta"] = {"content": text}
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason=delta.finish_reason)
        if delta.finish_reason is not None or not self.chat:
            choice["stop_reason"] = delta.stop_reason
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return _sse({**self._head(obj), "choices": [choice]})

    def usage_chunk(self) -> bytes:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return _sse({**self._head(obj), "choices": [], "usage": self.usage()})

    def error_chunk(self, error: GatewayError) -> bytes:
        return _sse(error.body())


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"
