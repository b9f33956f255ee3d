"""The Responses stream translator inside the gateway's relay: every text survives the fast path (token
chunks copied without a parse) exactly as a parse would read it, in any batching of events per read.

The engine's stream is fed to the real relay (gateway.backends.relay.relay_stream) with the translator
dispatch would stack: over vLLM 0.32's chat chunks (tests/support/fault_upstream.py's shape) through
Passthrough, and over a completions engine's chunks through ChatFromCompletion (the gateway's rendered
chat), as bytes.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from gateway.backends.relay import StreamWatch, relay_stream
from gateway.backends.translate import ChatFromCompletion, Passthrough, Translator
from gateway.responses.translate import ResponseTranslator

TEXTS = [" plain", ' say "hi"', "back\\slash\\", "\\\"", "new\nline\ttab", "é ü 😀 中文", "\u0001ctl", " </s>", ""]
VLLM_HEAD = b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":'


def _vllm(text: str | None, finish: str | None = None, role: bool = False) -> bytes:
    delta = {"role": "assistant", "content": ""} if role else {"content": text}
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    if not role:
        choice["token_ids"] = None
    return b"data: " + VLLM_HEAD + orjson.dumps([choice]) + b"}\n\n"


def _completion(text: str, finish: str | None = None) -> bytes:  # a completions engine's chunk
    return b"data: " + orjson.dumps({"id": "cmpl-2", "object": "text_completion", "created": 1, "model": "m",
                                     "choices": [{"index": 0, "text": text, "logprobs": None,
                                                  "finish_reason": finish}]}) + b"\n\n"


USAGE = b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[],' \
        b'"usage":{"prompt_tokens":3,"completion_tokens":9,"total_tokens":12}}\n\n'


class _Engine:
    """An engine's streamed answer, read by the relay in the given pieces."""

    def __init__(self, reads: list[bytes]) -> None:
        self.reads = reads

    async def chunks(self):
        for read in self.reads:
            yield read

    def close(self) -> None:
        pass

    async def finish(self) -> None:
        pass


def _run(reads: list[bytes], engine: Translator | None = None) -> list[dict]:
    async def collect() -> bytes:
        translator = ResponseTranslator({"id": "resp_t", "object": "response"}, "msg_t", None)
        relayed = relay_stream(_Engine(reads), translator.over(engine or Passthrough("m", "m")), "m", None,
                               StreamWatch(deadline=time.monotonic() + 60))
        return b"".join([part async for part in translator.stream(relayed)])

    text = asyncio.run(collect())
    return [orjson.loads(block.split(b"\n", 1)[1][len(b"data: "):]) for block in text.split(b"\n\n")[:-1]]


@pytest.mark.parametrize("engine", ["vllm chat", "completions"])
@pytest.mark.parametrize("per_read", [1, 3, 100, "37 bytes"])
def test_every_text_arrives_whole_however_the_events_are_batched(engine: str, per_read: int | str) -> None:
    """per_read: events per read of the engine's stream, or a size in bytes that cuts events apart."""
    texts = list(TEXTS)
    if engine == "vllm chat":
        events, translator = [_vllm(None, role=True)] + [_vllm(t) for t in TEXTS] + [_vllm("!", "stop")], None
    else:
        events, translator = [_completion(t) for t in TEXTS] + [_completion("!", "stop")], ChatFromCompletion("m")
        texts[0] = texts[0].lstrip()  # the rendered chat's answer starts at its first word (ChatFromCompletion)
    events += [USAGE, b"data: [DONE]\n\n"]
    if isinstance(per_read, str):
        stream, size = b"".join(events), int(per_read.split()[0])
        reads = [stream[i:i + size] for i in range(0, len(stream), size)]
    else:
        reads = [b"".join(events[i:i + per_read]) for i in range(0, len(events), per_read)]
    out = _run(reads, translator)
    deltas = [event["delta"] for event in out if event["type"] == "response.output_text.delta"]
    assert deltas == [t for t in texts if t] + ["!"]  # one event per chunk with text, each exactly as sent
    final = out[-1]
    assert final["type"] == "response.completed" and final["response"]["usage"]["total_tokens"] == 12
    assert final["response"]["output"][0]["content"][0]["text"] == "".join(texts) + "!"
    assert [event["sequence_number"] for event in out] == list(range(len(out)))


def test_a_last_chunk_with_the_finish_reason_and_usage_riding_along_is_read() -> None:
    last = b"data: " + VLLM_HEAD + b'[{"index":0,"delta":{"content":" end"},"logprobs":null,' \
           b'"finish_reason":"length","token_ids":null}],"usage":{"prompt_tokens":1,"completion_tokens":2,' \
           b'"total_tokens":3}}\n\n'
    out = _run([_vllm(" a") + last + b"data: [DONE]\n\n"])
    final = out[-1]["response"]
    assert out[-1]["type"] == "response.incomplete" and final["incomplete_details"]["reason"] == "max_output_tokens"
    assert final["output"][0]["content"][0]["text"] == " a end" and final["usage"]["total_tokens"] == 3


def test_a_malformed_or_failed_stream_ends_in_response_failed() -> None:
    garbage = _run([_vllm(" a") + b"data: {not json}\n\n"])
    assert garbage[-1]["type"] == "response.failed" and "malformed" in garbage[-1]["response"]["error"]["message"]
    broken = _run([_vllm(" a"), b'data: {"error":{"message":"The model backend disconnected.","type":'
                                 b'"upstream_error","param":null,"code":"upstream_disconnected"}}\n\n'])
    assert broken[-1]["response"]["error"] == {
        "code": "server_error",
        "message": "The model backend failed in the middle of the answer: The model backend disconnected."}
    cut = _run([_vllm(" a")])  # no [DONE], no error: never a response that looks complete
    assert cut[-1]["type"] == "response.failed" and cut[-1]["response"]["output"][0]["content"][0]["text"] == " a"
    assert cut[-1]["response"]["error"]["message"] == "The model backend disconnected in the middle of the answer."
