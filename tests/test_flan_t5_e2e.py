"""FLAN-T5 through the gateway: vLLM cannot serve T5, so our own seq2seq worker does (tiny random T5)."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import SEQ2SEQ_MODEL
from tests.support.processes import Server


@pytest.fixture(scope="module", autouse=True)
def _worker_ready(seq2seq_worker: Server) -> None:
    seq2seq_worker.wait_ready(180)


def test_chat_to_flan_t5(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=SEQ2SEQ_MODEL, messages=[{"role": "user", "content": "translate English to German: hello"}],
        max_tokens=6, extra_body={"ignore_eos": True})
    completion = raw.parse()
    assert raw.headers["x-gateway-backend"] == "test-seq2seq-tiny-t5"
    assert completion.object == "chat.completion" and completion.model == SEQ2SEQ_MODEL
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage.completion_tokens == 6 and completion.choices[0].finish_reason == "length"


def test_streamed_chat_to_flan_t5(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=SEQ2SEQ_MODEL, messages=[{"role": "user", "content": "summarize: the cat sat"}], max_tokens=5,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.model == SEQ2SEQ_MODEL for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_completion_to_flan_t5_streamed_and_not(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=SEQ2SEQ_MODEL, prompt="question: what is rain?", max_tokens=4,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert plain.object == "text_completion" and plain.usage.completion_tokens == 4
    chunks = list(client.completions.create(model=SEQ2SEQ_MODEL, prompt="question: what is rain?",
                                            max_tokens=4, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text


def test_flan_t5_context_is_512_tokens(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=SEQ2SEQ_MODEL, prompt="word " * 2000, max_tokens=4)
    error = caught.value.response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "512 tokens" in error["message"]
