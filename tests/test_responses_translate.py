"""The Responses stream translator on the chat stream the relay hands it: every text survives the fast path
(token chunks copied without a parse) exactly as a parse would read it, in any batching of events per read.

The input is the gateway's own relay output in vLLM 0.32's chunk shape (tests/support/fault_upstream.py),
and the gateway's rendered-chat shape (gateway.backends.translate.ChatFromCompletion), as bytes.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from gateway.responses.translate import ResponseTranslator

TEXTS = [" plain", ' say "hi"', "back\\slash\\", "\\\"", "new\nline\ttab", "é ü 😀 中文", "\u0001ctl", " </s>", ""]
VLLM_HEAD = b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":'


def _vllm(text: str | None, finish: str | None = None, role: bool = False) -> bytes:
    delta = {"role": "assistant", "content": ""} if role else {"content": text}
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    if not role:
        choice["token_ids"] = None
    return b"data: " + VLLM_HEAD + orjson.dumps([choice]) + b"}\n\n"


def _rendered(text: str, finish: str | None = None) -> bytes:  # ChatFromCompletion's key order
    return b"data: " + orjson.dumps({"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1,
                                     "model": "m", "choices": [{"index": 0, "delta": {"content": text},
                                                                "logprobs": None, "finish_reason": finish}]}) + b"\n\n"


USAGE = b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[],' \
        b'"usage":{"prompt_tokens":3,"completion_tokens":9,"total_tokens":12}}\n\n'


def _run(blobs: list[bytes]) -> list[dict]:
    async def chat():
        for blob in blobs:
            yield blob

    async def collect() -> bytes:
        translator = ResponseTranslator({"id": "resp_t", "object": "response"}, "msg_t", None)
        return b"".join([part async for part in translator.stream(chat())])

    text = asyncio.run(collect())
    return [orjson.loads(block.split(b"\n", 1)[1][len(b"data: "):]) for block in text.split(b"\n\n")[:-1]]


@pytest.mark.parametrize("shape", [_vllm, _rendered])
@pytest.mark.parametrize("per_read", [1, 3, 100])
def test_every_text_arrives_whole_however_the_events_are_batched(shape, per_read: int) -> None:
    events = [_vllm(None, role=True)] + [shape(t) for t in TEXTS] + [shape("!", "stop"), USAGE, b"data: [DONE]\n\n"]
    blobs = [b"".join(events[i:i + per_read]) for i in range(0, len(events), per_read)]
    out = _run(blobs)
    deltas = [event["delta"] for event in out if event["type"] == "response.output_text.delta"]
    assert deltas == [t for t in TEXTS if t] + ["!"]  # one event per chunk with text, each exactly as sent
    final = out[-1]
    assert final["type"] == "response.completed" and final["response"]["usage"]["total_tokens"] == 12
    assert final["response"]["output"][0]["content"][0]["text"] == "".join(TEXTS) + "!"
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
    assert broken[-1]["response"]["error"] == {"code": "server_error", "message": "The model backend disconnected."}
    cut = _run([_vllm(" a")])  # no [DONE], no error: never a response that looks complete
    assert cut[-1]["type"] == "response.failed" and cut[-1]["response"]["output"][0]["content"][0]["text"] == " a"
