"""The chat answer -> the Response: a JSON body, or OpenAI's event stream (the translator of this bridge,
as gateway.backends.translate holds those of the chat endpoints).

The stream, in OpenAI's order, every event with `event:` and a `sequence_number`, one response id and one
message id throughout (the SDK's stream helper refuses a change): `response.created`, `response.in_progress`,
`response.output_item.added`, `response.content_part.added` (all four at once, before the first token),
one `response.output_text.delta` per engine chunk with text, then `response.output_text.done`,
`response.content_part.done`, `response.output_item.done` and `response.completed` (`response.incomplete`
when the length limit stopped it). The final response is stored before its last event leaves (`save`).
An engine that breaks off after the first byte ends the stream with `response.failed` and the reason.

Two halves. As the relay's translator (`over`: stacked on the chat translator dispatch chose for the
engine) it turns each engine event into its delta event inside the relay's own pass over the events,
and keeps what the closing events need (text, finish reason, usage; the relay's `[DONE]` or error event).
`stream` wraps the relay's output: the opening events first, the closing ones (after the save) once the
relay's last event was seen. After `[DONE]` the relay still has to let go of the engine's connection and
report the outcome: the final events go out first, and the relay is then read to its end.

Cost: a token's chunk is the relay's hot loop. The common one (text, no finish reason, no usage, in the
compact shape of vLLM and of the gateway's own translators) is not parsed: its text is copied as the JSON
string it already is into the delta event (escapes and all: inside JSON strings every quote is escaped,
so the key pattern can only be the real key). The rest (the role chunk, the last chunk, usage, anything
shaped otherwise) is parsed. The text is kept JSON-escaped and decoded once, at the end. Engines whose
chunks are chat chunks already (`events_as_is`) are read directly, without the model name's replacement
or the chat framing that the client of this stream never sees.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson

from gateway.backends.translate import Translator
from gateway.responses import objects

Save = Callable[[dict[str, Any], bytes], Awaitable[None]]  # the final response, and its JSON
_DONE = b"[DONE]"
_CONTENT = b'"delta":{"content":"'
_UNFINISHED_TAIL = b'"},"logprobs":null,"finish_reason":null'  # vLLM's and the gateway's own chunks
_CONTENT_SIZE = len(_CONTENT)
_BACKSLASH = 0x5C


class ResponseTranslator:
    """One request's translator. `save`: stores the final response (None: `store` is false)."""

    def __init__(self, base: dict[str, Any], item_id: str, save: Save | None) -> None:
        self.base = base
        self.item_id = item_id
        self._save = save
        self._sequence = 0
        self._texts: list[bytes] = []  # the text so far, as JSON string contents (escaped, unquoted)
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None
        self._done = False
        self._error: dict[str, Any] | None = None
        self._delta_head = b""  # set by `stream`, which always runs before the relay it reads
        self._prefix: bytes | None = None  # what precedes the text in this stream's token chunks
        self._engine: Translator | None = None
        self._direct = False

    def final(self, data: bytes) -> dict[str, Any]:
        """A chat.completion body -> the final response."""
        completion = orjson.loads(data)
        choices = completion.get("choices") or [{}]
        message = choices[0].get("message") or {}
        return objects.finished(self.base, self.item_id, message.get("content") or "",
                                choices[0].get("finish_reason"), completion.get("usage"))

    def over(self, engine: Translator) -> ResponseTranslator:
        """This translator as the relay's for a stream whose engine events `engine` translates to chat."""
        self._engine = engine
        self._direct = engine.events_as_is
        return self

    # The relay's translator (gateway.backends.translate.Translator) for streams: frame, end.

    def frame(self, data: bytes) -> bytes:
        if self._error is not None:
            return b""  # the answer ends at the first malformed chunk
        if self._direct:
            return self._translate(data)
        return b"".join([self._translate(piece) for piece in self._engine.event(data)])

    def end(self, event: bytes) -> bytes:
        """The relay's `[DONE]` or error event: kept; the closing events follow from `stream`."""
        if self._error is None:
            self._parse(event.removeprefix(b"data: ").rstrip(b"\n"), [])
        return b""

    async def stream(self, relayed: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The relay's output (this translator's delta events) -> the whole Responses event stream."""
        self._delta_head = (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
                            b'"item_id":' + orjson.dumps(self.item_id) + b',"output_index":0,"content_index":0,'
                            b'"delta":"')
        try:
            yield self._opening()
            ended = False
            async for blob in relayed:
                if ended:
                    continue  # the relay finishing after [DONE] or an error: nothing more for the client
                if self._done or self._error is not None:
                    ended = True
                    blob += await asyncio.shield(self._closing())
                if blob:
                    yield blob
            if not ended:
                self._error = {"type": "server_error",
                               "message": "The model backend's stream ended without finishing the answer."}
                yield await asyncio.shield(self._closing())
        finally:
            await relayed.aclose()  # idempotent; shields its own engine release and bookkeeping

    def _translate(self, data: bytes) -> bytes:
        """One chat chunk's JSON -> its delta event (b"": no text). The common token chunk by offsets (a
        compare with the stream's known prefix, one search for the end of its text, O(1) checks after it);
        anything else parsed."""
        prefix = self._prefix
        if prefix is not None and data.startswith(prefix):
            start = len(prefix)
        else:
            start = data.find(_CONTENT)
            if start < 0:
                return self._parsed(data)
            start += _CONTENT_SIZE
            # A stream's token chunks share everything before their text (id, created, model): once seen,
            # the next one is recognised by a compare, not a search.
            prefix = self._prefix = data[:start] if start <= 512 else None
        end = data.find(b'"', start)
        if data[end - 1] == _BACKSLASH:
            end = _string_end(data, start)
        # Right after the text: no finish reason yet; the object closes after `choices` (no usage).
        if end >= 0 and data.startswith(_UNFINISHED_TAIL, end) and data.endswith(b"}]}"):
            if end == start:
                return b""
            text = data[start:end]
            self._texts.append(text)
            self._sequence += 1
            return b'%s%s","logprobs":[],"sequence_number":%d}\n\n' % (self._delta_head, text, self._sequence - 1)
        return self._parsed(data)

    def _parsed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        self._parse(data, out)
        return b"".join(out)

    def _parse(self, data: bytes, out: list[bytes]) -> None:
        if data == _DONE:
            self._done = True
            return
        try:
            self._chunk(orjson.loads(data), out)
        except (orjson.JSONDecodeError, AttributeError, TypeError):  # the relay checks only the braces
            self._error = {"type": "upstream_error", "message": "The model backend sent a malformed stream."}

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        if "error" in chunk:
            self._error = chunk["error"] if isinstance(chunk["error"], dict) else {}
            return
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue  # one choice: the bridge never asks for more
            text = (choice.get("delta") or {}).get("content")
            if text:
                if not isinstance(text, str):
                    raise TypeError("content is not text")
                quoted = orjson.dumps(text)
                self._texts.append(quoted[1:-1])
                out.append(self._delta_head + quoted[1:] + b',"logprobs":[],"sequence_number":%d}\n\n' % self._next())
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
        if chunk.get("usage"):
            self._usage = chunk["usage"]

    def _opening(self) -> bytes:
        base = orjson.dumps(self.base)  # once, for both events that carry it
        return b"".join((
            self._event_with_response("response.created", base),
            self._event_with_response("response.in_progress", base),
            self._event("response.output_item.added", output_index=0,
                        item=objects.message_item(self.item_id, "in_progress", [])),
            self._event("response.content_part.added", item_id=self.item_id, output_index=0, content_index=0,
                        part=objects.text_part("")),
        ))

    async def _closing(self) -> bytes:
        text = orjson.loads(b'"' + b"".join(self._texts) + b'"')
        if self._error is not None:
            code = "invalid_prompt" if self._error.get("type") == "invalid_request_error" else "server_error"
            message = str(self._error.get("message") or "The model backend failed in the middle of the answer.")
            final = objects.failed(self.base, self.item_id, text, code, message)
            encoded = orjson.dumps(final)
            if self._save is not None:
                try:
                    await self._save(final, encoded)
                except Exception:  # the failure is what the client must hear about
                    pass
            return self._event_with_response("response.failed", encoded)
        final = objects.finished(self.base, self.item_id, text, self._finish_reason, self._usage)
        encoded = orjson.dumps(final)  # once: the last event and the stored response
        if self._save is not None:
            try:
                await self._save(final, encoded)
            except Exception:
                # Acknowledged means stored: a completed event here would promise a chain that cannot continue.
                final = objects.failed(self.base, self.item_id, text, "server_error",
                                       "The response could not be stored (the response store is unavailable); "
                                       "retry, or send store: false.")
                return self._event("response.failed", response=final)
        item = final["output"][0]
        return b"".join((
            self._event("response.output_text.done", item_id=self.item_id, output_index=0, content_index=0,
                        text=text, logprobs=[]),
            self._event("response.content_part.done", item_id=self.item_id, output_index=0, content_index=0,
                        part=item["content"][0]),
            self._event("response.output_item.done", output_index=0, item=item),
            self._event_with_response(f"response.{final['status']}", encoded),
        ))

    def _event_with_response(self, kind: str, response: bytes) -> bytes:
        head = kind.encode()
        return (b"event: " + head + b'\ndata: {"type":"' + head + b'","response":' + response
                + b',"sequence_number":%d}\n\n' % self._next())

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, **fields, "sequence_number": self._next()}
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    def _next(self) -> int:
        self._sequence += 1
        return self._sequence - 1


def _string_end(data: bytes, start: int) -> int:
    """The index of the quote that ends the JSON string starting at `start` (-1: none)."""
    end = data.find(b'"', start)
    while end > start and data[end - 1] == _BACKSLASH:
        before = end - 1
        while before >= start and data[before] == _BACKSLASH:
            before -= 1
        if (end - 1 - before) % 2 == 0:  # an even run of backslashes escapes itself, not the quote
            break
        end = data.find(b'"', end + 1)
    return end
