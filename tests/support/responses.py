"""For the Responses API tests: a gateway in front of the session's llama.cpp (no vLLM needed), and the
event stream as it arrived on the wire."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

from tests.conftest import ROOT, tenants_document
from tests.support.processes import Server, free_port, start_server

# The session's llama.cpp runs with --n_ctx 2048: the registry entry says so here, so that the gateway's
# context check (which covers a whole stored conversation) is the one that answers.
LLAMA_CPP_CONTEXT = 2048


def llama_cpp_gateway(llama_cpp: Server, log_dir: Path, workdir: Path, name: str,
                      env: dict[str, str] | None = None) -> Iterator[Server]:
    local = yaml.safe_load((ROOT / "deploy/local/registry.yaml").read_text())
    model = local["models"][0]
    model["context_length"] = LLAMA_CPP_CONTEXT
    model["backends"] = [{**model["backends"][0], "url": llama_cpp.url}]
    (workdir / "overlay.yaml").write_text(yaml.safe_dump(local))
    (workdir / "tenants.yaml").write_text(yaml.safe_dump(tenants_document()))
    port = free_port()
    server = start_server(name, [sys.executable, "-m", "gateway", "serve", "--port", str(port)], port, "/ready",
                          log_dir, {"GATEWAY_REGISTRY": f"{ROOT / 'model_registry.yaml'},{workdir / 'overlay.yaml'}",
                                    "GATEWAY_TENANTS": str(workdir / "tenants.yaml"),
                                    "GATEWAY_AUDIT_SINK": str(workdir / "audit.jsonl"),
                                    "GATEWAY_HEALTH_PROBE_INTERVAL_S": "1", **(env or {})})
    try:
        server.wait_ready(60)
        yield server
    finally:
        server.stop()


def sse(text: str) -> list[tuple[str, dict]]:
    """(event name, data) of each SSE event, checking OpenAI's framing: `event:` then `data:`, one each."""
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text.split("\n\n")[:-1]:
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        data = json.loads(lines[1][len("data: "):])
        assert data["type"] == lines[0][len("event: "):], block
        events.append((data["type"], data))
    return events


# --- the clients built on the Responses API, each checked the same way on every engine -------------------

def check_agents_sdk(base_url: str, key: str, model: str, extra_body: dict | None = None) -> None:
    """The Agents SDK's default model (OpenAIResponsesModel): `Runner.run`, `Runner.run_streamed`, and a
    second turn that continues the first by `previous_response_id` (the gateway holds the conversation)."""
    import asyncio

    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # tracing uploads to OpenAI by default

    async def run() -> None:
        client = AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=300)
        agent = Agent(name="helper", instructions="Answer briefly.",
                      model=OpenAIResponsesModel(model=model, openai_client=client),
                      model_settings=ModelSettings(temperature=0, extra_body=extra_body))
        first = await Runner.run(agent, "What is 2+2? Answer with a number only.")
        [raw] = first.raw_responses
        assert isinstance(first.final_output, str) and first.final_output == _text(raw)
        assert first.last_response_id and first.last_response_id.startswith("resp_")

        streamed = Runner.run_streamed(agent, "What is 2+2? Answer with a number only.")
        deltas = [event.data.delta async for event in streamed.stream_events()
                  if event.type == "raw_response_event" and event.data.type == "response.output_text.delta"]
        assert streamed.final_output == "".join(deltas) == _text(streamed.raw_responses[-1])

        second = await Runner.run(agent, "Now add 1.", previous_response_id=first.last_response_id)
        stored = await client.responses.retrieve(second.last_response_id)
        assert stored.previous_response_id == first.last_response_id
        # The first turn (its question and answer) was part of the second's prompt.
        assert second.raw_responses[-1].usage.input_tokens > raw.usage.input_tokens + raw.usage.output_tokens
        await client.close()

    asyncio.run(run())


def check_langchain(base_url: str, key: str, model: str, extra_body: dict | None = None) -> None:
    """LangChain's `ChatOpenAI(use_responses_api=True)`: invoke, and stream to the same message."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=model, base_url=base_url, api_key=key, use_responses_api=True, temperature=0,
                     max_retries=0, timeout=300, extra_body=extra_body)
    question = "What is 2+2? Answer with a number only."
    message = llm.invoke(question)
    assert message.response_metadata["status"] == "completed" and message.id.startswith("resp_")
    assert message.text and message.usage_metadata["output_tokens"] > 0
    chunks = list(llm.stream(question))
    assert len(chunks) > 2  # arrived as it was generated
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    assert whole.text == message.text  # greedy: the same tokens either way
    assert whole.usage_metadata["input_tokens"] == message.usage_metadata["input_tokens"]
    assert whole.usage_metadata["output_tokens"] == message.usage_metadata["output_tokens"]


def _text(response) -> str:
    return "".join(part.text for item in response.output if item.type == "message" for part in item.content
                   if part.type == "output_text")
