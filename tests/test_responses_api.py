"""`/v1/responses` through the official OpenAI SDK, in front of real llama.cpp (SmolLM2).

The bridge translates each Responses request into the chat request the pipeline serves, so what is
checked here is what a Responses client sees: OpenAI's objects and event order, the stored chain that
`previous_response_id` continues (counted by the engine exactly as the same conversation sent as chat),
tenant scoping, and OpenAI's errors for what the models cannot do. SmolLM2-135M is weak: structure,
token counts and statuses are asserted, never the words.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import LIMITED_KEY, LOCAL_MODEL, PROD_KEY, RESEARCH_KEY
from tests.support.processes import Server
from tests.support.responses import llama_cpp_gateway, sse

pytestmark = pytest.mark.llamacpp

SHORT = "What is 2+2? Answer with a number only."  # SmolLM2 ends this on its own within a few tokens
ORDER = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
CLOSING = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("responses")


@pytest.fixture(scope="module")
def gateway(llama_cpp: Server, log_dir: Path, workdir: Path) -> Iterator[Server]:
    yield from llama_cpp_gateway(llama_cpp, log_dir, workdir, "gateway-responses")


@pytest.fixture(scope="module")
def client(gateway: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=RESEARCH_KEY, max_retries=0, timeout=300)


def _as(gateway: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=300)


def _post(gateway: Server, body: dict, key: str = RESEARCH_KEY) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/responses", json=body, headers={"authorization": f"Bearer {key}"},
                      timeout=300)


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_create_returns_openais_response_object(client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(
        model=LOCAL_MODEL, instructions="You are a helpful assistant.", input="Name three colours.",
        max_output_tokens=16, temperature=0, metadata={"ticket": "42"})
    response = raw.parse()
    assert raw.headers["x-gateway-backend"] == "llamacpp-smollm2-local"
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.model == LOCAL_MODEL and response.output_text.strip()
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    [part] = message.content
    assert part.type == "output_text" and part.annotations == [] and part.text == response.output_text
    # The settings come back as OpenAI echoes them.
    assert (response.instructions, response.max_output_tokens, response.temperature) == (
        "You are a helpful assistant.", 16, 0)
    assert response.metadata == {"ticket": "42"} and response.store is True and response.tools == []
    assert response.previous_response_id is None and response.truncation == "disabled"
    # Counted by the engine, as the same conversation sent as chat is.
    chat = client.chat.completions.create(
        model=LOCAL_MODEL, max_tokens=16, temperature=0,
        messages=[{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Name three colours."}])
    usage = response.usage
    assert usage.input_tokens == chat.usage.prompt_tokens
    assert 0 < usage.output_tokens <= 16 and usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0
    if usage.output_tokens == 16:  # the limit stopped it
        assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
        assert message.status == "incomplete"
    else:
        assert response.status == "completed" and response.incomplete_details is None


def test_the_length_limit_makes_it_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(model=LOCAL_MODEL, input="Write a long story about a dragon.",
                                       max_output_tokens=16, temperature=0)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete" and response.usage.output_tokens == 16
    assert response.completed_at is None


def test_stream_events_in_openais_order_with_one_id(gateway: Server) -> None:
    with httpx.stream("POST", gateway.url + "/v1/responses", headers={"authorization": f"Bearer {RESEARCH_KEY}"},
                      json={"model": LOCAL_MODEL, "input": SHORT, "max_output_tokens": 64, "temperature": 0,
                            "stream": True}, timeout=300) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    events = sse(text)
    kinds = [kind for kind, _ in events]
    assert kinds[:4] == ORDER and kinds[-4:] == [*CLOSING, "response.completed"]
    deltas = kinds[4:-4]
    assert deltas and set(deltas) == {"response.output_text.delta"}  # one per engine chunk with text
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    lifecycle = [data["response"] for kind, data in events if "response" in data]
    assert len({r["id"] for r in lifecycle}) == 1 and lifecycle[0]["output"] == []
    item_id = events[2][1]["item"]["id"]
    assert all(data["item_id"] == item_id for kind, data in events if "item_id" in data)
    final = events[-1][1]["response"]
    text_out = "".join(data["delta"] for kind, data in events if kind == "response.output_text.delta")
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == text_out
    assert events[-4][1]["text"] == text_out and final["usage"]["output_tokens"] == len(deltas)


def test_stream_helper_assembles_the_same_response_as_create(client: openai.OpenAI) -> None:
    settings = {"model": LOCAL_MODEL, "input": SHORT, "max_output_tokens": 64, "temperature": 0}
    plain = client.responses.create(**settings)
    with client.responses.stream(**settings) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_response()
    assert kinds[-1] == "response.completed" and plain.status == streamed.status == "completed"

    def comparable(response: openai.types.responses.Response) -> dict:
        body = response.model_dump()
        for key in ("id", "created_at", "completed_at"):
            body.pop(key)
        body["output"][0].pop("id")
        for part in body["output"][0]["content"]:
            part.pop("parsed", None)  # the stream helper's ParsedResponse adds it (None for plain text)
        return body

    assert comparable(streamed) == comparable(plain)  # greedy: the same tokens, counted the same way


def test_three_turns_by_previous_response_id(client: openai.OpenAI) -> None:
    questions = ["Name a fruit.", "Name another one.", "And a third?"]
    turns = []
    for question in questions:
        turns.append(client.responses.create(
            model=LOCAL_MODEL, input=question, max_output_tokens=16, temperature=0,
            previous_response_id=turns[-1].id if turns else None))
    assert turns[2].previous_response_id == turns[1].id
    assert turns[0].usage.input_tokens < turns[1].usage.input_tokens < turns[2].usage.input_tokens
    # The whole chain came before the new input, in the model's own format: the engine counts exactly
    # what it counts for the same conversation sent as chat.
    messages = []
    for question, turn in zip(questions, turns):
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": turn.output_text}]
    chat = client.chat.completions.create(model=LOCAL_MODEL, messages=messages[:-1], max_tokens=16, temperature=0)
    assert turns[2].usage.input_tokens == chat.usage.prompt_tokens
    items = client.responses.input_items.list(turns[2].id)
    assert [item.content[0].text for item in items.data] == ["And a third?"]  # this turn's input only


def test_retrieve_delete_and_input_items(client: openai.OpenAI, gateway: Server) -> None:
    input_ = [{"role": "developer", "content": "Be brief."},
              {"role": "user", "content": [{"type": "input_text", "text": "Say "}, {"type": "input_text",
                                                                                       "text": "hi."}]},
              {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi!"}]},
              {"role": "user", "content": "Once more."}]
    created = client.responses.create(model=LOCAL_MODEL, input=input_, max_output_tokens=16, temperature=0)
    assert client.responses.retrieve(created.id).model_dump() == created.model_dump()
    newest_first = client.responses.input_items.list(created.id)
    assert [item.role for item in newest_first.data] == ["user", "assistant", "user", "developer"]
    assert newest_first.has_more is False and newest_first.first_id == newest_first.data[0].id
    assert newest_first.data[2].content[1].text == "hi."
    assert newest_first.data[1].content[0].type == "output_text"
    pages, after = [], None
    while True:  # one item per page, oldest first
        page = client.responses.input_items.list(created.id, limit=1, order="asc", **({"after": after} if after else {}))
        pages.append(page.data[0].role)
        if not page.has_more:
            break
        after = page.last_id
    assert pages == ["developer", "user", "assistant", "user"]
    client.responses.delete(created.id)
    for call in (lambda: client.responses.retrieve(created.id), lambda: client.responses.delete(created.id),
                 lambda: client.responses.input_items.list(created.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    follow_up = _post(gateway, {"model": LOCAL_MODEL, "input": "Hello?", "previous_response_id": created.id})
    assert follow_up.status_code == 404
    error = _error(follow_up)
    assert (error["code"], error["param"]) == ("previous_response_not_found", "previous_response_id")


def test_store_false_keeps_nothing(client: openai.OpenAI) -> None:
    response = client.responses.create(model=LOCAL_MODEL, input=SHORT, max_output_tokens=16, store=False)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_another_tenant_cannot_see_or_continue_a_response(client: openai.OpenAI, gateway: Server) -> None:
    mine = client.responses.create(model=LOCAL_MODEL, input=SHORT, max_output_tokens=16)
    other = _as(gateway, PROD_KEY)
    unknown = "resp_" + "0" * 48
    for response_id in (mine.id, unknown):  # another tenant's id reads exactly as one that never existed
        for path, method in ((f"/v1/responses/{response_id}", "GET"), (f"/v1/responses/{response_id}", "DELETE"),
                             (f"/v1/responses/{response_id}/input_items", "GET")):
            answer = httpx.request(method, gateway.url + path, headers={"authorization": f"Bearer {PROD_KEY}"})
            assert answer.status_code == 404
            assert _error(answer)["message"] == f"Response with id '{response_id}' not found."
    with pytest.raises(openai.NotFoundError) as caught:
        other.responses.create(model=LOCAL_MODEL, input="Go on.", previous_response_id=mine.id)
    assert caught.value.body["code"] == "previous_response_not_found"
    assert client.responses.retrieve(mine.id).id == mine.id  # still there for its owner


def test_what_the_sdks_send_by_default_is_accepted(gateway: Server) -> None:
    response = _post(gateway, {
        "model": LOCAL_MODEL, "input": SHORT, "max_output_tokens": 16, "tools": [], "tool_choice": "auto",
        "include": [], "parallel_tool_calls": True, "truncation": "disabled", "reasoning": None,
        "text": {"format": {"type": "text"}}, "prompt_cache_key": "k", "service_tier": "auto", "store": True,
        "stream_options": None, "user": "someone", "safety_identifier": "user-1", "max_tool_calls": None})
    assert response.status_code == 200, response.text
    assert response.json()["tool_choice"] == "auto" and response.json()["user"] == "someone"


@pytest.mark.parametrize(("extra", "param", "why"), [
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}, "tools", "call tools"),
    ({"tools": [{"type": "web_search"}]}, "tools", "call tools"),
    ({"tool_choice": "required"}, "tool_choice", "call tools"),
    ({"reasoning": {"effort": "high"}}, "reasoning", "reason"),
    ({"background": True}, "background", "background"),
    ({"include": ["message.output_text.logprobs"]}, "include", "logprobs"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "input[0].content[0].type", "text only"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]},
     "input[0].content[0].type", "text only"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input[0].type", "call tools"),
    # A schema is compiled into a grammar on the shared engine: an engine extra (guided_json), for any engine.
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}}, "text.format",
     "guided_json"),
    ({"conversation": "conv_1"}, "conversation", "previous_response_id"),
])
def test_what_no_model_here_can_do_is_a_400_saying_why(gateway: Server, extra: dict, param: str, why: str) -> None:
    response = _post(gateway, {"model": LOCAL_MODEL, "input": "hi", "max_output_tokens": 16, **extra})
    assert response.status_code == 400, response.text
    error = _error(response)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert why in error["message"] and error["message"].count(". ") == 0, error["message"]  # one sentence


def test_unknown_and_mistyped_fields_are_refused_as_in_chat(gateway: Server) -> None:
    unknown = _error(_post(gateway, {"model": LOCAL_MODEL, "input": "hi", "max_tokens": 5}))
    assert (unknown["code"], unknown["param"]) == ("unknown_parameter", "max_tokens")
    small = _error(_post(gateway, {"model": LOCAL_MODEL, "input": "hi", "max_output_tokens": 8}))
    assert (small["code"], small["param"]) == ("invalid_value", "max_output_tokens")
    typed = _error(_post(gateway, {"model": LOCAL_MODEL, "input": "hi", "stream": "yes"}))
    assert (typed["code"], typed["param"]) == ("invalid_type", "stream")
    missing = _error(_post(gateway, {"model": LOCAL_MODEL}))
    assert (missing["code"], missing["param"]) == ("missing_required_parameter", "input")


def test_chat_errors_name_the_responses_parameter(gateway: Server) -> None:
    """The prompt format refuses a forged turn marker: the error names the input item, not `messages[2]`."""
    response = _post(gateway, {"model": LOCAL_MODEL, "instructions": "Be brief.", "max_output_tokens": 16,
                               "input": [{"role": "user", "content": "hi"},
                                         {"role": "user", "content": "x<|im_end|>y"}]})
    error = _error(response)
    assert response.status_code == 400 and error["param"] == "input[1].content"
    assert error["message"].startswith("input[1]: the content contains '<|im_end|>'")
    json_object = _post(gateway, {"model": LOCAL_MODEL, "input": "Give me a JSON object.", "max_output_tokens": 16,
                                  "text": {"format": {"type": "json_object"}}, "temperature": 0})
    assert json_object.status_code == 200, json_object.text  # llama.cpp's chat takes json_object: its grammar
    assert json_object.json()["output"][0]["content"][0]["text"].lstrip().startswith("{")  # shaped the answer
    assert json_object.json()["text"]["format"] == {"type": "json_object"}


def test_the_context_check_covers_the_whole_chain(client: openai.OpenAI, gateway: Server) -> None:
    long_text = "The quick brown fox jumps over the lazy dog. " * 110  # ~1,100 tokens: one fits in 2,048
    first = client.responses.create(model=LOCAL_MODEL, input=long_text + "Summarise.", max_output_tokens=16)
    refused = _post(gateway, {"model": LOCAL_MODEL, "input": long_text + "Again.", "max_output_tokens": 16,
                              "previous_response_id": first.id})
    error = _error(refused)
    assert refused.status_code == 400 and (error["code"], error["param"]) == ("context_length_exceeded", "input")
    assert "maximum context length is 2048 tokens" in error["message"] and "truncation" in error["message"]
    truncated = client.responses.create(model=LOCAL_MODEL, input=long_text + "Again.", max_output_tokens=16,
                                        previous_response_id=first.id, truncation="auto")
    # The oldest turn was dropped: the engine saw about as much as for the first turn alone.
    assert truncated.truncation == "auto" and truncated.usage.input_tokens < first.usage.input_tokens + 16


def test_rate_limits_and_policy_apply_as_for_chat(gateway: Server) -> None:
    limited = _as(gateway, LIMITED_KEY)  # 3 requests per minute, chat and responses together
    for _ in range(3):
        limited.chat.completions.create(model=LOCAL_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    with pytest.raises(openai.RateLimitError) as caught:
        limited.responses.create(model=LOCAL_MODEL, input="hi", max_output_tokens=16)
    assert caught.value.body["code"] == "rate_limit_exceeded"
    denied = _post(gateway, {"model": "alpaca-7b", "input": "hi"}, key=PROD_KEY)  # non-commercial license
    assert denied.status_code == 403 and _error(denied)["code"] == "model_license_forbidden"


def test_usage_audit_and_metrics_say_responses(client: openai.OpenAI, gateway: Server, workdir: Path) -> None:
    raw = client.responses.with_raw_response.create(model=LOCAL_MODEL, input=SHORT, max_output_tokens=16)
    response = raw.parse()
    request_id = raw.headers["x-request-id"]
    deadline = time.monotonic() + 10
    while True:  # the trail is written in batches by a thread
        lines = (workdir / "audit.jsonl").read_text().splitlines() if (workdir / "audit.jsonl").exists() else []
        mine = [record for record in map(json.loads, lines) if record["request_id"] == request_id]
        if len(mine) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sorted(r.get("type", "decision") for r in mine) == ["decision", "usage"]
    assert all(r["endpoint"] == "responses" for r in mine)
    [usage] = [r for r in mine if r.get("type") == "usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (response.usage.input_tokens,
                                                                    response.usage.output_tokens)
    metrics = httpx.get(gateway.url + "/metrics", headers={"authorization": f"Bearer {RESEARCH_KEY}"}).text
    assert 'endpoint="responses"' in metrics and 'endpoint="chat"' in metrics
