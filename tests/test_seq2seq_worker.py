"""Our seq2seq (FLAN-T5) worker, started for real on the tiny random-weight T5, spoken to with the openai SDK.

Random weights make the words meaningless: the tests assert the wire format, token counts, finish
reasons and the server's behaviour under load. `ignore_eos` (the vLLM extension the worker honours)
makes lengths deterministic; temperature 0 makes the text deterministic.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from gateway.prompts.formats import FORMATS
from gateway.prompts.messages import to_turns
from gateway.wire.protocol import ChatMessage
from gateway.workers.seq2seq_decode import Delta, TextTracker
from tests.conftest import TEST_MODELS
from tests.support.processes import Server, free_port, start_server

MODEL = "tiny-t5-test"
MAX_NEW_TOKENS = 4096  # above the default 512, so a generation can be made long enough to hold a slot
PROMPT = "the quick brown fox"
GREEDY = {"temperature": 0}
TO_LENGTH = {"ignore_eos": True}  # vLLM extension: run to max_tokens whatever the random model says


def _messages(messages: list[dict]) -> list[ChatMessage]:
    return [ChatMessage.model_validate(message) for message in messages]


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model_dir = TEST_MODELS / "tiny-t5"
    if not (model_dir / "config.json").exists():
        pytest.fail(f"{model_dir} missing: run `make test-models` (tests/support/make_test_models.py)")
    port = free_port()
    argv = [sys.executable, "-m", "gateway.workers.seq2seq", "--model", str(model_dir),
            "--served-model-name", MODEL, "--port", str(port), "--max-concurrency", "2",
            "--threads", "1", "--max-new-tokens", str(MAX_NEW_TOKENS)]
    server = start_server("seq2seq-tiny-t5", argv, port, "/health", tmp_path_factory.mktemp("seq2seq-logs"))
    try:
        server.wait_ready(120)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(worker: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=worker.url + "/v1", api_key="x", max_retries=0, timeout=60)


def count_tokens(worker: Server, text: str) -> int:
    response = httpx.post(worker.url + "/tokenize", json={"model": MODEL, "prompt": text})
    assert response.status_code == 200
    return response.json()["count"]


def test_health_models_and_tokenize(worker: Server, client: openai.OpenAI) -> None:
    assert httpx.get(worker.url + "/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [MODEL]
    body = httpx.post(worker.url + "/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()
    assert body["count"] == len(body["tokens"]) > 1 and body["max_model_len"] == 512
    assert body["tokens"][-1] == 1  # T5's `</s>` ends every encoder input and is counted


def test_completion(worker: Server, client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=7, extra_body=TO_LENGTH)
    assert completion.id.startswith("cmpl-") and completion.object == "text_completion"
    assert completion.model == MODEL and completion.created > 0
    [choice] = completion.choices
    assert choice.index == 0 and choice.logprobs is None and choice.finish_reason == "length"
    assert isinstance(choice.text, str)
    usage = completion.usage
    assert usage.prompt_tokens == count_tokens(worker, PROMPT)
    assert usage.completion_tokens == 7 and usage.total_tokens == usage.prompt_tokens + 7


def test_completion_defaults_to_16_tokens(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL, prompt=PROMPT, extra_body=TO_LENGTH)
    assert completion.usage.completion_tokens == 16


@pytest.mark.parametrize("prompt", ["hello", PROMPT, "Translate to German: good morning", "1 2 3 4 5"])
def test_max_tokens_bounds_what_the_model_says(client: openai.OpenAI, prompt: str) -> None:
    """Without ignore_eos the random model may stop early; the finish reason must say which happened."""
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, **GREEDY)
    tokens, reason = completion.usage.completion_tokens, completion.choices[0].finish_reason
    assert 1 <= tokens <= 5
    assert reason == "length" and tokens == 5 or reason == "stop"


def test_streamed_completion_matches_unstreamed(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=9, extra_body=TO_LENGTH,
                                      **GREEDY)
    chunks = list(client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=9, stream=True, stream_options={"include_usage": True},
        extra_body=TO_LENGTH, **GREEDY))
    text_chunks = [c for c in chunks if c.choices]
    assert all(c.object == "text_completion" and c.id == chunks[0].id and c.model == MODEL for c in chunks)
    assert len(text_chunks) == 9  # one chunk per generated token, as vLLM streams
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks] == [None] * 8 + ["length"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    assert sum(1 for c in chunks if c.usage is not None) == 1


def test_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, stream=True))
    assert all(c.choices and c.usage is None for c in chunks)


def test_chat(worker: Server, client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Name a colour."}]
    completion = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                                extra_body=TO_LENGTH)
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    [choice] = completion.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length" and choice.logprobs is None
    prompt = FORMATS["flan-t5"].render(to_turns(_messages(messages)))
    assert completion.usage.prompt_tokens == count_tokens(worker, prompt)
    assert completion.usage.completion_tokens == 6


def test_chat_default_max_tokens_is_capped(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "go on"}], extra_body=TO_LENGTH)
    assert completion.usage.completion_tokens == 256
    assert completion.choices[0].finish_reason == "length"


def test_streamed_chat(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5,
                                           extra_body=TO_LENGTH, **GREEDY)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, stream=True, stream_options={"include_usage": True},
        extra_body=TO_LENGTH, **GREEDY))
    assert all(c.object == "chat.completion.chunk" and c.id.startswith("chatcmpl-") for c in chunks)
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.delta.content == "" and first.finish_reason is None
    content = [c for c in chunks[1:] if c.choices]
    assert len(content) == 5 == chunks[-1].usage.completion_tokens
    assert "".join(c.choices[0].delta.content for c in content) == whole.choices[0].message.content
    assert content[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_n_choices(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=2, seed=3,
                                           temperature=1.0, extra_body=TO_LENGTH)
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, n=2, stream=True,
        stream_options={"include_usage": True}, extra_body=TO_LENGTH))
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    assert roles == [0, 1]
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks
                if c.choices and c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length"} and chunks[-1].usage.completion_tokens == 6


def test_batched_prompts_token_ids_and_echo(worker: Server, client: openai.OpenAI) -> None:
    batch = client.completions.create(model=MODEL, prompt=["one", "two three"], max_tokens=2, n=2,
                                      extra_body=TO_LENGTH)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]  # prompt-major, as vLLM numbers them
    assert batch.usage.prompt_tokens == count_tokens(worker, "one") + count_tokens(worker, "two three")
    ids = httpx.post(worker.url + "/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, extra_body=TO_LENGTH, **GREEDY)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, extra_body=TO_LENGTH,
                                        **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text and by_ids.usage == by_text.usage
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, echo=True,
                                       extra_body=TO_LENGTH, **GREEDY)
    assert echoed.choices[0].text == PROMPT + by_text.choices[0].text


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0,
                                         seed=seed, extra_body=TO_LENGTH).choices[0].text
    assert sample(11) == sample(11)
    assert len({sample(seed) for seed in range(4)}) > 1  # and the seed does change the draw


def test_stop_string_truncates(client: openai.OpenAI) -> None:
    """Random weights: take a piece of the greedy output as the stop string; the answer must end before it."""
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, extra_body=TO_LENGTH,
                                     **GREEDY).choices[0].text
    assert len(full) >= 8, full
    stop = full[4:8]
    expected = full[:full.index(stop)]
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40,
                                           stop=["@@never@@", stop], extra_body=TO_LENGTH, **GREEDY)
    assert completion.choices[0].text == expected
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens < 40
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, stop=stop, stream=True,
                                            extra_body=TO_LENGTH, **GREEDY))
    # Streamed text never shows the stop string, not even its first characters.
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize(("body", "param"), [
    ({"temperature": 3}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"max_tokens": MAX_NEW_TOKENS + 1}, "max_tokens"),
    ({"stop": 5}, "stop"),
    ({"logprobs": 2}, "logprobs"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"top_k": -7}, "top_k"),
])
def test_bad_completion_params_get_400_naming_the_param(client: openai.OpenAI, body: dict,
                                                        param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=PROMPT, extra_body=body)
    assert caught.value.body["param"] == param
    assert caught.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize(("messages", "param"), [
    ([], "messages"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "messages[1].role"),
    ([{"role": "tool", "content": "42", "tool_call_id": "t"}], "messages[0].role"),
])
def test_bad_chat_messages_get_400(client: openai.OpenAI, messages: list, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=messages)
    assert caught.value.body["param"] == param


def test_missing_prompt_and_bad_json(worker: Server) -> None:
    response = httpx.post(worker.url + "/v1/completions", json={"model": MODEL})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    response = httpx.post(worker.url + "/v1/completions", content=b"{not json")
    assert response.status_code == 400 and "error" in response.json()


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="no-such-model", prompt=PROMPT)
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"


def test_prompt_over_512_tokens_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 600}])
    assert caught.value.body["code"] == "context_length_exceeded"
    assert caught.value.body["param"] == "messages"


def _long_stream(http: httpx.Client) -> httpx.Response:
    """Start a stream that would run for many seconds (4096 tokens); its slot is held while it runs."""
    request = http.build_request("POST", "/v1/completions", json={
        "model": MODEL, "prompt": PROMPT, "max_tokens": MAX_NEW_TOKENS, "stream": True, **TO_LENGTH})
    return http.send(request, stream=True)


def _slots_free(worker: Server, count: int) -> bool:
    """Can `count` long generations start at once right now? (They are dropped straight away.)"""
    with httpx.Client(base_url=worker.url, timeout=30) as http:
        streams = []
        try:
            for _ in range(count):
                streams.append(_long_stream(http))
                if streams[-1].status_code != 200:
                    return False
            return True
        finally:
            for stream in streams:
                stream.close()


def test_busy_worker_answers_429_stays_responsive_and_frees_slots_on_disconnect(
        worker: Server, client: openai.OpenAI) -> None:
    with httpx.Client(base_url=worker.url, timeout=30) as http:
        streams = [_long_stream(http), _long_stream(http)]
        # The first event means its generation is running. Keep the line iterators: dropping one
        # closes its connection (httpcore closes on GeneratorExit), which would end the generation.
        lines = [stream.iter_lines() for stream in streams]
        for stream, it in zip(streams, lines):
            assert stream.status_code == 200 and next(it).startswith("data: ")
        # Both generations run in threads: the event loop still answers at once.
        for _ in range(5):
            started = time.monotonic()
            assert httpx.get(worker.url + "/health", timeout=5).status_code == 200
            assert time.monotonic() - started < 1.0
        # All --max-concurrency 2 slots are taken: a third request is turned away, not queued.
        with pytest.raises(openai.RateLimitError) as caught:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        assert caught.value.body["type"] == "rate_limit_error"
        assert caught.value.body["code"] == "engine_overloaded"
        assert int(caught.value.response.headers["retry-after"]) >= 1
        for it, stream in zip(lines, streams):
            assert next(it) == ""  # still streaming (SSE blank line), then hang up
            stream.close()
    # The clients went away: both generations stop at their next step (running to 4096 tokens would
    # take several more seconds), so both slots are free again within moments.
    deadline = time.monotonic() + 3
    while not _slots_free(worker, 2):
        assert time.monotonic() < deadline, "closing the streams did not stop their generations"
        time.sleep(0.1)
    _wait_until_served(worker)


def test_abandoned_unstreamed_request_frees_its_slot(worker: Server) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_NEW_TOKENS, **TO_LENGTH}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 4096 tokens are done
        httpx.post(worker.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    deadline = time.monotonic() + 3
    while not _slots_free(worker, 2):
        assert time.monotonic() < deadline, "the abandoned request kept generating"
        time.sleep(0.1)
    _wait_until_served(worker)


def _wait_until_served(worker: Server) -> None:
    """Streams dropped by `_slots_free` stop at their next step; wait for that before the next test."""
    deadline = time.monotonic() + 5
    while httpx.post(worker.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}
                     ).status_code == 429:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_worker_log_is_clean(worker: Server) -> None:
    log = worker.log_text()
    assert "loaded" in log and "Traceback" not in log


# -- the detokenizer on its own (no server): rules random weights rarely exercise ---------------------

def _bytes_decode(ids: list[int]) -> str:
    """A byte-level 'tokenizer': token id = byte value, so one character can span two tokens."""
    return bytes(ids).decode("utf-8", errors="replace")


def test_tracker_waits_for_whole_characters() -> None:
    tracker = TextTracker(_bytes_decode, rows=1, max_tokens=10)
    ids = list("aé!".encode())  # é is two bytes: two tokens, one character
    deltas = [d for token in ids for d in tracker.step([token])]
    assert [d.text for d in deltas] == ["a", "", "é", "!"]  # one delta per token, none with U+FFFD


def test_tracker_holds_back_a_possible_stop_string() -> None:
    """The last len("STOP") - 1 characters wait until they cannot be the start of the stop string."""
    tracker = TextTracker(_bytes_decode, rows=2, max_tokens=20, stop=["STOP"])
    deltas = [tracker.step([a, b]) for a, b in zip(b"abSTOPzz", b"abSTxyzw")]
    row0 = [d for step in deltas for d in step if d.row == 0]
    row1 = [d.text for step in deltas for d in step if d.row == 1]
    assert [d.text for d in row0] == ["", "", "", "a", "b", ""]  # "ST" of "STOP" never shown
    assert row0[-1] == Delta(0, "", "stop", "STOP") and tracker.text(0) == "ab"
    assert row1 == ["", "", "", "a", "b", "S", "T", "x"] and tracker.done == [True, False]
    assert tracker.finish_all("length") == [Delta(1, "yzw", "length")]  # held-back text is flushed


def test_tracker_eos_and_length() -> None:
    tracker = TextTracker(_bytes_decode, rows=2, max_tokens=2, eos_ids=[1])
    first = tracker.step([ord("a"), 1])
    assert first[1] == Delta(1, "", "stop") and first[0].finish_reason is None
    second = tracker.step([ord("b"), 0])  # row 1 is finished: its padding is ignored
    assert second == [Delta(0, "b", "length")] and tracker.tokens(0) == 2 and tracker.tokens(1) == 1
