"""The fault-injecting fake engine (tests/support/fault_upstream.py) does what its modes promise, in vLLM 0.32's
wire format."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.processes import Server, free_port, start_server

MODEL = "tiny-llama"
# Key order of vLLM 0.32.0's answers (test_constants_match_real_vllm checks them against the real engine).
COMPLETION_KEYS = ["id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
                   "usage", "kv_transfer_params", "ec_transfer_params", "metrics"]
COMPLETION_CHOICE_KEYS = ["index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids", "prompt_logprobs",
                          "prompt_token_ids", "routed_experts"]
CHAT_KEYS = ["id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
             "usage", "prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params",
             "ec_transfer_params", "metrics"]
CHAT_CHOICE_KEYS = ["index", "message", "logprobs", "finish_reason", "stop_reason", "token_ids", "routed_experts"]
CHAT_MESSAGE_KEYS = ["role", "content", "refusal", "annotations", "audio", "function_call", "reasoning"]
USAGE_KEYS = ["prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details",
              "completion_tokens_details"]


def shape(value: object) -> object:
    """The nested key structure (keys in order, values' shapes) with the scalars left out."""
    if isinstance(value, dict):
        return [(k, shape(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [shape(v) for v in value[:1]]
    return None


def sse_events(text: str) -> list[str]:
    """The data payloads of an SSE body framed as vLLM frames it: `data: {json}\\n\\n` ... `data: [DONE]\\n\\n`."""
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    blocks = text.split("\n\n")
    assert blocks[-1] == ""
    assert all(block.startswith("data: ") and "\n" not in block for block in blocks[:-1]), text
    return [block[len("data: "):] for block in blocks[:-1]]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    server = start_server(
        "fault-upstream",
        [sys.executable, "-m", "tests.support.fault_upstream", "--port", str(port), "--served-model-name", MODEL],
        port,
        "/health",
        tmp_path_factory.mktemp("fault-upstream"),
    )
    try:
        server.wait_ready(15)
        yield server
    finally:
        server.stop(timeout_s=5)


@pytest.fixture()
def up(upstream: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=upstream.url, timeout=5) as client:
        assert client.post("/control/reset").status_code == 200
        yield client
        client.post("/control/reset")


def set_mode(client: httpx.Client, mode: str, **params: object) -> None:
    response = client.post("/control/mode", json={"mode": mode, **params})
    assert response.status_code == 200, response.text


def completion(stream: bool = False, **extra: object) -> dict:
    return {"model": MODEL, "prompt": "Hello world", "max_tokens": 4, "stream": stream, **extra}


def chat(stream: bool = False, **extra: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi there you"}], "max_tokens": 4,
            "stream": stream, **extra}


def records(client: httpx.Client) -> list[dict]:
    return client.get("/control/requests").json()


# ---- vLLM shapes --------------------------------------------------------------------------------------------


def test_constants_match_real_vllm(vllm_fleet: dict) -> None:
    """The key orders above are vLLM 0.32.0's own: checked against the real engine the suite runs."""
    engine = vllm_fleet[MODEL]
    completion_json = httpx.post(engine.url + "/v1/completions", json=completion(), timeout=60).json()
    chat_json = httpx.post(engine.url + "/v1/chat/completions", json=chat(), timeout=60).json()
    assert list(completion_json) == COMPLETION_KEYS
    assert list(completion_json["choices"][0]) == COMPLETION_CHOICE_KEYS
    assert list(completion_json["usage"]) == USAGE_KEYS
    assert list(chat_json) == CHAT_KEYS
    assert list(chat_json["choices"][0]) == CHAT_CHOICE_KEYS
    assert list(chat_json["choices"][0]["message"]) == CHAT_MESSAGE_KEYS


def test_normal_json_answers_have_vllm_shapes(up: httpx.Client, vllm_fleet: dict) -> None:
    body = up.post("/v1/completions", json=completion()).json()
    assert list(body) == COMPLETION_KEYS and list(body["choices"][0]) == COMPLETION_CHOICE_KEYS
    assert list(body["usage"]) == USAGE_KEYS
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"][0]["text"] == " tok0 tok1 tok2 tok3" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 7, "completion_tokens": 4,
                             "prompt_tokens_details": None, "completion_tokens_details": None}
    assert body["system_fingerprint"].startswith("vllm-0.32.0-")

    body = up.post("/v1/chat/completions", json=chat()).json()
    assert list(body) == CHAT_KEYS and list(body["choices"][0]) == CHAT_CHOICE_KEYS
    assert list(body["choices"][0]["message"]) == CHAT_MESSAGE_KEYS
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == " tok0 tok1 tok2 tok3"

    real = vllm_fleet[MODEL].url  # the same requests to vLLM 0.32.0 itself: the same nested shapes
    for path, payload in (("/v1/completions", completion()), ("/v1/chat/completions", chat())):
        sample = httpx.post(real + path, json=payload, timeout=60).json()
        assert shape(up.post(path, json=payload).json()) == shape(sample)


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_normal_streams_have_vllm_shapes(up: httpx.Client, vllm_fleet: dict, kind: str) -> None:
    path, payload = ("/v1/completions", completion) if kind == "completion" else ("/v1/chat/completions", chat)
    response = up.post(path, json=payload(stream=True, stream_options={"include_usage": True}))
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers.get("transfer-encoding") == "chunked"
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    # a preamble (empty-text chunk / role chunk), 4 tokens, the usage chunk
    assert len(chunks) == 6
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"].startswith("cmpl-" if kind == "completion" else "chatcmpl-")
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    assert list(usage) == ["id", "object", "created", "model", "choices", "usage", "system_fingerprint"]
    if kind == "completion":
        assert chunks[0]["choices"][0]["text"] == ""
        text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    else:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == " tok0 tok1 tok2 tok3"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])

    # event by event against vLLM 0.32.0 itself: first, a middle one, the finish, the usage
    real = httpx.post(vllm_fleet[MODEL].url + path, json=payload(stream=True, stream_options={"include_usage": True}),
                      timeout=60)
    sample = [json.loads(e) for e in sse_events(real.text)[:-1]]
    for ours, theirs in ((chunks[0], sample[0]), (chunks[2], sample[2]), (chunks[-2], sample[-2]),
                             (chunks[-1], sample[-1])):
        assert shape(ours) == shape(theirs), (ours, theirs)

    # without include_usage: no usage chunk, the fingerprint rides on the finish chunk (vLLM 0.32's code)
    chunks = [json.loads(e) for e in sse_events(up.post(path, json=payload(stream=True)).text)[:-1]]
    assert len(chunks) == 5 and "usage" not in chunks[-1]
    assert list(chunks[-1])[-1] == "system_fingerprint" and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_models_tokenize_and_unknown_model(up: httpx.Client) -> None:
    models = up.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    tokens = up.post("/tokenize", json={"model": MODEL, "prompt": "one two three"}).json()
    assert list(tokens)[:3] == ["count", "max_model_len", "tokens"] and tokens["count"] == 4
    assert len(tokens["tokens"]) == 4
    response = up.post("/v1/completions", json={**completion(), "model": "other"})
    assert response.status_code == 404
    assert response.json()["error"] == {"message": "The model `other` does not exist. Valid aliases: tiny-llama.",
                                        "type": "NotFoundError", "param": "model", "code": 404}


def test_x_request_id_becomes_the_id(up: httpx.Client) -> None:
    body = up.post("/v1/chat/completions", json=chat(), headers={"x-request-id": "abc123"}).json()
    assert body["id"] == "chatcmpl-abc123"
    assert records(up)[-1]["id"] == "chatcmpl-abc123"


def test_ttft_and_inter_chunk_delays(up: httpx.Client) -> None:
    set_mode(up, "normal", ttft_s=0.4, inter_chunk_s=0.05, chunks=3)
    start = time.monotonic()
    with up.stream("POST", "/v1/completions", json=completion(stream=True)) as response:
        headers_at = time.monotonic() - start
        lines = response.iter_lines()
        first = next(line for line in lines if line)
        first_at = time.monotonic() - start
        rest = [line for line in lines if line]
    assert headers_at < 0.3 <= 0.4 <= first_at < 1.5
    assert json.loads(first[6:])["choices"][0]["text"] == ""
    assert len(rest) == 4  # 3 tokens, [DONE]
    assert records(up)[-1]["chunks_sent"] == 5


# ---- faults -------------------------------------------------------------------------------------------------


def test_hang_before_headers(up: httpx.Client, upstream: Server) -> None:
    set_mode(up, "hang_before_headers")
    start = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(upstream.url + "/v1/completions", json=completion(), timeout=httpx.Timeout(5, read=0.5))
    assert time.monotonic() - start < 2
    record = wait_for_record(up, lambda r: r["disconnected"])
    assert record["chunks_sent"] == 0 and record["ended"] is not None and record["mode"] == "hang_before_headers"


def test_close_mid_stream_breaks_the_connection_after_the_chunks(up: httpx.Client, upstream: Server) -> None:
    for kind, path, payload in (("completion", "/v1/completions", completion), ("chat", "/v1/chat/completions", chat)):
        set_mode(up, "close_mid_stream", after=3)
        seen = []
        with httpx.Client(base_url=upstream.url, timeout=5) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                with client.stream("POST", path, json=payload(stream=True)) as response:
                    assert response.status_code == 200
                    for line in response.iter_lines():
                        if line:
                            seen.append(line)
        assert len(seen) == 3, (kind, seen)
        assert all(json.loads(line[6:])["choices"] for line in seen)
        record = records(up)[-1]
        assert record["chunks_sent"] == 3 and record["ended"] is not None and not record["disconnected"]

    # a TCP reset instead of a FIN
    set_mode(up, "close_mid_stream", after=1, how="rst")
    with httpx.Client(base_url=upstream.url, timeout=5) as client:
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            with client.stream("POST", "/v1/completions", json=completion(stream=True)) as response:
                for _ in response.iter_lines():
                    pass

    # not streamed: Content-Length promised, half the body, then the cut
    set_mode(up, "close_mid_stream", times=1)
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(upstream.url + "/v1/completions", json=completion(), timeout=5)
    assert up.post("/v1/completions", json=completion()).status_code == 200  # the server itself is fine


def test_error_mid_stream(up: httpx.Client) -> None:
    set_mode(up, "error_mid_stream", after=2)
    events = sse_events(up.post("/v1/chat/completions", json=chat(stream=True)).text)
    assert len(events) == 4
    assert events[2] == ('{"error": {"message": "Internal server error", "type": "InternalServerError", '
                         '"param": null, "code": 500}}')


def test_garbage(up: httpx.Client) -> None:
    set_mode(up, "garbage")
    response = up.post("/v1/completions", json=completion())
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.text)
    response = up.post("/v1/completions", json=completion(stream=True))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in response.text
    with pytest.raises(AssertionError):
        sse_events(response.text)


def test_status_503_has_vllm_error_shape(up: httpx.Client) -> None:
    set_mode(up, "status")
    response = up.post("/v1/chat/completions", json=chat(stream=True))
    assert response.status_code == 503 and response.headers["content-type"] == "application/json"
    error = response.json()
    assert list(error) == ["error"] and list(error["error"]) == ["message", "type", "param", "code"]
    assert error["error"]["code"] == 503 and error["error"]["param"] is None
    assert error["error"]["type"] == "Service Unavailable"  # vLLM's QueueOverflowError (a GracefulHTTPError)

    set_mode(up, "status", status=500, message="boom")
    assert up.post("/v1/completions", json=completion()).json() == {
        "error": {"message": "boom", "type": "InternalServerError", "param": None, "code": 500}}


def test_times_falls_back_to_normal(up: httpx.Client) -> None:
    set_mode(up, "status", status=503, times=2)
    assert up.get("/control/mode").json() == {"mode": "status", "status": 503, "times": 2}
    codes = [up.post("/v1/completions", json=completion()).status_code for _ in range(3)]
    assert codes == [503, 503, 200]
    assert up.get("/control/mode").json() == {"mode": "normal", "times": None}
    assert [r["mode"] for r in records(up)] == ["status", "status", "normal"]


def test_unhealthy(up: httpx.Client) -> None:
    set_mode(up, "unhealthy", times=2)
    assert up.post("/v1/completions", json=completion()).status_code == 200  # not a use of `times`
    assert [up.get("/health").status_code for _ in range(3)] == [503, 503, 200]


def test_hang_mid_stream_sees_the_client_go_within_a_second(up: httpx.Client, upstream: Server) -> None:
    set_mode(up, "hang_mid_stream", after=2)
    client = httpx.Client(base_url=upstream.url, timeout=5)
    with client.stream("POST", "/v1/completions", json=completion(stream=True)) as response:
        lines = response.iter_lines()
        got = [next(line for line in lines if line) for _ in range(2)]
        assert all(line.startswith("data: {") for line in got)
        time.sleep(0.2)
        record = records(up)[-1]
        assert record["chunks_sent"] == 2 and record["ended"] is None and not record["disconnected"]
    client.close()  # the stream's connection is closed with it (the response was not read to the end)
    closed_at = time.time()
    record = wait_for_record(up, lambda r: r["disconnected"], within_s=1)
    assert record["ended"] - closed_at < 1
    assert record["chunks_sent"] == 2

    # not streamed: a hang before the headers
    set_mode(up, "hang_mid_stream")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(upstream.url + "/v1/completions", json=completion(), timeout=httpx.Timeout(5, read=0.3))
    wait_for_record(up, lambda r: r["disconnected"], within_s=1)


def test_requests_are_recorded_and_cleared(up: httpx.Client) -> None:
    up.post("/v1/completions", json=completion())
    up.post("/tokenize", json={"prompt": "x"})  # not a generation request
    [record] = records(up)
    assert set(record) >= {"id", "path", "body", "started", "ended", "disconnected", "chunks_sent"}
    assert record["path"] == "/v1/completions" and record["body"] == completion()
    assert record["started"] <= record["ended"] and record["disconnected"] is False
    assert up.delete("/control/requests").status_code == 200
    assert records(up) == []


def wait_for_record(client: httpx.Client, predicate, within_s: float = 2) -> dict:
    deadline = time.monotonic() + within_s
    while True:
        record = records(client)[-1]
        if predicate(record):
            return record
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s}s: {record}")
        time.sleep(0.02)
