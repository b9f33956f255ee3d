"""One translator per (what the client asked, what the engine answers) pair.

Each turns an engine's JSON body (`body`) or stream event (`event`; `frame` with the SSE framing, the
one the relay calls) into the client's. `Passthrough`: the engine already answers in the client's shape;
only the model name changes, by a byte replacement (no parse). `ChatFromCompletion`: the gateway
rendered the chat into a prompt and called `/v1/completions`; the engine's `text_completion` (and its
chunks) become a `chat.completion` (and `chat.completion.chunk`s: role first, then content,
finish_reason on the last content chunk).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import orjson


class Translator(Protocol):
    events_as_is: ClassVar[bool]

    def body(self, data: bytes) -> bytes: ...

    def event(self, data: bytes) -> Iterator[bytes]:
        """One engine stream event's data -> the data of the client's events."""

    def frame(self, data: bytes) -> bytes:
        """One engine stream event's data -> the client's SSE bytes (what the relay sends)."""

    def end(self, event: bytes) -> bytes:
        """The relay's own last event (`data: [DONE]`, or an error event) -> what the client gets."""


class SseChat:
    """Chat and completions streams: each event's data framed as `data: ...`, the relay's last event as is.
    `events_as_is`: the engine's stream events are already the client's chunks but for the model name (a
    translator stacked on this one may read the engine's events directly: gateway/responses)."""

    events_as_is: ClassVar[bool] = False

    def event(self, data: bytes) -> Iterator[bytes]:
        raise NotImplementedError

    def frame(self, data: bytes) -> bytes:
        return b"".join([b"data: %b\n\n" % piece for piece in self.event(data)])

    def end(self, event: bytes) -> bytes:
        return event


@dataclass(frozen=True)
class Passthrough(SseChat):
    """Replace the engine's model name with the id the client asked for.

    Inside JSON strings every quote is escaped, so `"model":"<name>"` can only match the real key.
    """

    served: str
    requested: str
    _pairs: tuple[tuple[bytes, bytes], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        old, new = orjson.dumps(self.served), orjson.dumps(self.requested)
        pairs = ((b'"model":' + old, b'"model":' + new), (b'"model": ' + old, b'"model": ' + new))
        object.__setattr__(self, "_pairs", pairs if self.served != self.requested else ())

    def body(self, data: bytes) -> bytes:
        for old, new in self._pairs:
            if old in data:
                return data.replace(old, new, 1)
        return data

    events_as_is: ClassVar[bool] = True

    def event(self, data: bytes) -> Iterator[bytes]:
        yield self.body(data)

    def frame(self, data: bytes) -> bytes:
        return b"data: %b\n\n" % self.body(data)  # the hot path: one format, no generator


@dataclass(frozen=True)
class ChatWithRefusal(SseChat):
    """Chat from an engine whose non-streamed message leaves out `refusal` (llama.cpp): that body is
    parsed once to add OpenAI's `refusal: null`, which typed clients expect; stream events pass through."""

    passthrough: Passthrough

    def body(self, data: bytes) -> bytes:
        answer = orjson.loads(data)
        for choice in answer.get("choices") or ():
            message = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(message, dict):
                message.setdefault("refusal", None)
        answer["model"] = self.passthrough.requested
        return orjson.dumps(answer)

    events_as_is: ClassVar[bool] = True

    def event(self, data: bytes) -> Iterator[bytes]:
        return self.passthrough.event(data)

    def frame(self, data: bytes) -> bytes:
        return self.passthrough.frame(data)


@dataclass(frozen=True)
class CompletionLogprobs(SseChat):
    """Completions with `logprobs`: where the engine has no prediction for a token (the first token of an
    `echo`ed prompt: vLLM and OpenAI send `null` there) the spec still requires a number and an object;
    the gateway sends `0.0` (the token was given, not predicted: it adds nothing to a sum of logprobs)
    and `{}` (no alternatives). Only requests that ask for logprobs pay for the parse."""

    passthrough: Passthrough

    def body(self, data: bytes) -> bytes:
        answer = orjson.loads(data)
        _fill_logprob_gaps(answer)
        answer["model"] = self.passthrough.requested
        return orjson.dumps(answer)

    def event(self, data: bytes) -> Iterator[bytes]:
        if b'"logprobs":null' in data or b'"logprobs": null' in data or b"null" not in data:
            yield self.passthrough.body(data)
            return
        chunk = orjson.loads(data)
        _fill_logprob_gaps(chunk)
        chunk["model"] = self.passthrough.requested
        yield orjson.dumps(chunk)


def _fill_logprob_gaps(answer: dict[str, Any]) -> None:
    for choice in answer.get("choices") or ():
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        if not isinstance(logprobs, dict):
            continue
        if isinstance(logprobs.get("token_logprobs"), list):
            logprobs["token_logprobs"] = [0.0 if v is None else v for v in logprobs["token_logprobs"]]
        if isinstance(logprobs.get("top_logprobs"), list):
            logprobs["top_logprobs"] = [{} if v is None else v for v in logprobs["top_logprobs"]]
        if isinstance(logprobs.get("text_offset"), list):
            logprobs["text_offset"] = [0 if v is None else v for v in logprobs["text_offset"]]


@dataclass
class ChatFromCompletion(SseChat):
    requested: str
    _started: set[int] = field(default_factory=set)  # choices whose role chunk was sent
    _speaking: set[int] = field(default_factory=set)  # choices whose first non-space text was sent

    def body(self, data: bytes) -> bytes:
        completion = orjson.loads(data)
        choices = [
            {
                "index": choice.get("index", 0),
                "message": {"role": "assistant", "content": (choice.get("text") or "").lstrip(), "refusal": None},
                "logprobs": _chat_logprobs(choice.get("logprobs")),
                "finish_reason": choice.get("finish_reason"),
            }
            for choice in completion.get("choices", ())
        ]
        return orjson.dumps({**self._envelope(completion, "chat.completion"), "choices": choices,
                             "usage": completion.get("usage")})

    def event(self, data: bytes) -> Iterator[bytes]:
        chunk = orjson.loads(data)
        envelope = self._envelope(chunk, "chat.completion.chunk")
        if not chunk.get("choices"):
            yield orjson.dumps({**envelope, "choices": [], "usage": chunk.get("usage")})
            return
        for choice in chunk["choices"]:
            index = choice.get("index", 0)
            if index not in self._started:
                self._started.add(index)
                yield orjson.dumps({**envelope, "choices": [
                    {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}]})
            text = choice.get("text") or ""
            if index not in self._speaking:
                text = text.lstrip()  # "ASSISTANT: Hi" -> the model's first token is " Hi"
                if text:
                    self._speaking.add(index)
            delta = {"content": text} if text else {}
            yield orjson.dumps({**envelope, "choices": [
                {"index": index, "delta": delta, "logprobs": _chat_logprobs(choice.get("logprobs")),
                 "finish_reason": choice.get("finish_reason")}]})

    def _envelope(self, completion: dict[str, Any], kind: str) -> dict[str, Any]:
        upstream_id = str(completion.get("id", ""))
        return {
            "id": "chatcmpl-" + upstream_id.removeprefix("cmpl-"),
            "object": kind,
            "created": completion.get("created"),
            "model": self.requested,
        }


def _chat_logprobs(logprobs: dict[str, Any] | None) -> dict[str, Any] | None:
    """Completions' parallel lists -> chat's list of {token, logprob, bytes, top_logprobs}."""
    if not logprobs or not logprobs.get("tokens"):
        return None
    tops = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
    content = []
    for token, logprob, top in zip(logprobs["tokens"], logprobs.get("token_logprobs") or (), tops):
        content.append({
            "token": token,
            "logprob": logprob,
            "bytes": list(token.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                             for t, lp in (top or {}).items()],
        })
    return {"content": content}
