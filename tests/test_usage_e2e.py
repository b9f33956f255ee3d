"""Real engines: the usage record of a request equals the engine's own `usage` (0 tokens off), streamed and
not, for llama.cpp, vLLM and the seq2seq worker; llama.cpp streams are counted by the gateway, and marked so."""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest

from tests.conftest import LOCAL_MODEL, RESEARCH_KEY, SEQ2SEQ_MODEL, client_for
from tests.support.processes import Server

CHAT = [{"role": "user", "content": "Name three colours."}]


def _record(log_dir: Path, request_id: str) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in (log_dir / "audit.jsonl").read_text().splitlines():
            if request_id in line:
                record = json.loads(line)
                if record.get("type") == "usage" and record["request_id"] == request_id:
                    return record
        time.sleep(0.1)
    raise AssertionError(f"no usage record for {request_id}")


@pytest.mark.parametrize(("model", "stream_source"), [
    (LOCAL_MODEL, "gateway"),  # llama.cpp sends no usage in streams
    ("llama-2-7b-chat", "engine"),  # vLLM
    (SEQ2SEQ_MODEL, "engine"),  # our worker
])
def test_usage_record_equals_the_engines_usage(gateway: Server, vllm_fleet: dict[str, Server], log_dir: Path,
                                               model: str, stream_source: str) -> None:
    api: openai.OpenAI = client_for(gateway, RESEARCH_KEY)
    answer = api.chat.completions.create(model=model, messages=CHAT, max_tokens=8)
    stream = api.chat.completions.create(model=model, messages=CHAT, max_tokens=8, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = next(chunk.usage for chunk in chunks if chunk.usage)
    plain_id, stream_id = answer._request_id, stream.response.headers["x-request-id"]  # the gateway's ids
    assert plain_id and stream_id and plain_id != stream_id
    plain, stream = _record(log_dir, plain_id), _record(log_dir, stream_id)
    for record, usage, source, is_stream in ((plain, answer.usage, "engine", False),
                                             (stream, streamed, stream_source, True)):
        assert (record["prompt_tokens"], record["completion_tokens"], record["total_tokens"]) == (
            usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
        assert record["usage_source"] == source and record["stream"] is is_stream
        assert record["status"] == 200 and record["model_served"] == model and record["tenant"] == "research-lab"
        assert record["backend"] and isinstance(record["fallback"], bool) and record["duration_ms"] > 0
        assert record["license"] and record["commercial_use"] in {"yes", "no", "conditional"}
    assert stream["ttft_ms"] is not None and plain["ttft_ms"] is None
