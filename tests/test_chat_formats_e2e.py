"""Chat to template-less models through a real vLLM: the gateway renders the model's own prompt format,
calls the engine's /v1/completions, and answers as a chat endpoint would. The client cannot tell.
"""

from __future__ import annotations

import re

import openai
import pytest

from tests.support.processes import Server

# registry id -> (tiny checkpoint serving it, a stop string its format must send to the engine)
TEMPLATELESS = {
    "vicuna-7b-v1.3": ("tiny-llama", "USER:"),
    "redpajama-incite-7b-chat": ("tiny-gpt-neox", "<human>"),
    "falcon-7b-instruct": ("tiny-falcon", "\nUser:"),
    "mpt-7b-chat": ("tiny-mpt", "<|im_end|>"),
}
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "how are you"},
]


@pytest.fixture(scope="module", autouse=True)
def _engines_ready(vllm_fleet: dict[str, Server]) -> None:
    """Wait for the whole fleet (started at session start) before the first request."""


def _received(engine: Server, marker: str) -> str:
    """The engine's own log line for the request whose stop list contains `marker`."""
    lines = [line for line in engine.log_text().splitlines() if "Received request" in line and marker in line]
    assert lines, f"{engine.name} never logged a request with {marker!r}"
    return lines[-1]


@pytest.mark.parametrize("model_id", list(TEMPLATELESS))
def test_chat_comes_back_as_a_chat_completion(client: openai.OpenAI, model_id: str,
                                              vllm_fleet: dict[str, Server]) -> None:
    engine_name, format_stop = TEMPLATELESS[model_id]
    marker = f"zz-{model_id}-plain"
    completion = client.chat.completions.create(
        model=model_id, messages=CONVERSATION, max_tokens=6, stop=[marker], extra_body={"ignore_eos": True})
    assert completion.object == "chat.completion" and completion.model == model_id
    assert completion.id.startswith("chatcmpl-")
    message = completion.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str)
    assert completion.choices[0].finish_reason in {"length", "stop"}
    assert 0 < completion.usage.completion_tokens <= 6
    received = _received(vllm_fleet[engine_name], marker)
    # The client's stop first, then the format's own, as the engine saw them.
    assert re.search(r"stop=\[" + re.escape(repr(marker)), received), received
    assert repr(format_stop).strip("'") in received


@pytest.mark.parametrize("model_id", list(TEMPLATELESS))
def test_streamed_chat_looks_like_a_native_chat_stream(client: openai.OpenAI, model_id: str) -> None:
    chunks = list(client.chat.completions.create(
        model=model_id, messages=CONVERSATION, max_tokens=5, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert all(c.object == "chat.completion.chunk" and c.model == model_id for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    finishing = [c for c in with_choices if c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0] is with_choices[-1]
    assert chunks[-1].choices == [] and 0 < chunks[-1].usage.completion_tokens <= 5
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    plain = client.chat.completions.create(model=model_id, messages=CONVERSATION, max_tokens=5,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert isinstance(text, str) and plain.usage.prompt_tokens == chunks[-1].usage.prompt_tokens


@pytest.mark.parametrize(("model_id", "engine_name", "kept"), [
    ("vicuna-7b-v1.3", "tiny-llama", "'USER:'"), ("llama-2-7b-chat", "tiny-llama", None),
    ("mpt-7b-chat", "tiny-mpt", "'<|im_end|>'")])
def test_stop_strings_that_repeat_the_eos_are_not_sent(client: openai.OpenAI, vllm_fleet: dict[str, Server],
                                                        model_id: str, engine_name: str, kept: str | None) -> None:
    """The engine stops at EOS anyway; a stop string equal to it only delays the stream in vLLM."""
    marker = f"zz-{model_id}-eos"
    client.chat.completions.create(model=model_id, messages=CONVERSATION, max_tokens=2, stop=[marker])
    received = _received(vllm_fleet[engine_name], marker)
    assert "'</s>'" not in received and "'<|endoftext|>'" not in received, received
    assert kept is None or kept in received


def test_mpt_chat_sends_its_turn_end_token_ids(client: openai.OpenAI, vllm_fleet: dict[str, Server]) -> None:
    client.chat.completions.create(model="mpt-7b-chat", messages=CONVERSATION, max_tokens=2, stop=["zz-mpt-ids"])
    received = _received(vllm_fleet["tiny-mpt"], "zz-mpt-ids")
    assert "stop_token_ids=[50278, 0]" in received


def test_multi_turn_to_a_single_turn_format_is_a_400_naming_the_message(client: openai.OpenAI) -> None:
    """Alpaca is single-turn: the second user turn cannot be expressed, and no engine is called."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="alpaca-7b", messages=CONVERSATION)
    error = caught.value.response.json()["error"]
    assert error["param"] == "messages[2]" and error["code"] == "unsupported_message"


def test_tool_messages_are_refused_naming_the_index(client: openai.OpenAI) -> None:
    messages = [*CONVERSATION[1:3], {"role": "tool", "content": "42", "tool_call_id": "call_1"}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="vicuna-7b-v1.3", messages=messages)
    assert caught.value.response.json()["error"]["param"] == "messages[2].role"
