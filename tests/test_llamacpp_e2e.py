"""The embedded default: SmolLM2 on real llama.cpp behind the gateway, driven by the official SDK.

SmolLM2-135M at Q4 is weak, so these tests assert structure, token counts and finish reasons, never
the words.
"""

from __future__ import annotations

import time

import openai
import pytest

from tests.conftest import LOCAL_MODEL

QUESTION = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Name three colours."}]


def test_chat_returns_real_text_under_the_requested_model_id(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=LOCAL_MODEL, messages=QUESTION, max_tokens=16, temperature=0)
    completion = raw.parse()
    assert raw.headers["x-gateway-backend"] == "llamacpp-smollm2-local"
    assert completion.object == "chat.completion"
    assert completion.model == LOCAL_MODEL  # not llama.cpp's alias "smollm2-local"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in {"stop", "length"}
    assert 0 < completion.usage.completion_tokens <= 16
    assert completion.usage.prompt_tokens > 10


def test_chat_stream_arrives_incrementally_and_ends_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=LOCAL_MODEL, messages=QUESTION, max_tokens=32, temperature=0, stream=True,
        stream_options={"include_usage": True})
    arrivals, chunks = [], []
    for chunk in stream:
        arrivals.append(time.monotonic())
        chunks.append(chunk)
    assert all(chunk.model == LOCAL_MODEL for chunk in chunks)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) >= 3
    # Relayed as generated: the first token reached us well before the last one was produced.
    assert arrivals[-1] - arrivals[0] > 0.05
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == len(content_chunks)
    assert usage_chunk.usage.prompt_tokens > 10
    assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + len(content_chunks)
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=LOCAL_MODEL, messages=QUESTION, max_tokens=8, stream=True))
    assert chunks and all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)


def test_completion_not_streamed(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=LOCAL_MODEL, prompt="The sky is", max_tokens=8, temperature=0)
    assert completion.object == "text_completion" and completion.model == LOCAL_MODEL
    assert isinstance(completion.choices[0].text, str) and completion.usage.completion_tokens > 0


def test_streamed_completion_usage_matches_the_engines_own_count(client: openai.OpenAI) -> None:
    prompt = "Once upon a time, in a small village by the sea,"
    plain = client.completions.create(model=LOCAL_MODEL, prompt=prompt, max_tokens=12, temperature=0)
    chunks = list(client.completions.create(
        model=LOCAL_MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    # The gateway counted the prompt with llama.cpp's own tokenizer: same number the engine reports.
    assert usage.prompt_tokens == plain.usage.prompt_tokens
    assert usage.completion_tokens == plain.usage.completion_tokens
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text  # greedy: same tokens either way


def test_streamed_chat_usage_matches_the_non_streamed_count(client: openai.OpenAI) -> None:
    """llama.cpp sends no usage chunk; the gateway's own (rendered SmolLM2 ChatML, counted by the
    engine's tokenizer) must agree with what the engine reports for the same chat."""
    plain = client.chat.completions.create(model=LOCAL_MODEL, messages=QUESTION, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(
        model=LOCAL_MODEL, messages=QUESTION, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_over_long_prompt_is_refused_before_the_engine(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=LOCAL_MODEL, max_tokens=100,
            messages=[{"role": "user", "content": "lorem ipsum dolor sit amet " * 2000}])
    error = caught.value.response.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "messages")
    assert "maximum context length is 8192 tokens" in error["message"]
