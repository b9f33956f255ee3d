"""Tokens charged against a tenant's TPM equal the engine's own count of each request, on a mixed workload.

The engine's count is its `usage` where the answer carries one, and, for streams whose client never asked
for usage, vLLM's Prometheus counters (prompt + generation tokens) around that request (n = 1 there: for
n > 1 the counters count the prompt once per choice, the usage once). The charge is read back from the
gateway's `x-ratelimit-remaining-tokens` after the workload, for a tenant whose token limit never binds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import openai
import pytest

from tests.conftest import METERED_KEY, METERED_TPM, client_for
from tests.support.processes import Server

CHAT = [{"role": "user", "content": "Count to five."}]
EOS_OFF = {"ignore_eos": True}


def _engine_tokens(engine: Server) -> float:
    text = httpx.get(engine.url + "/metrics").text
    wanted = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(wanted))


def _usage_of(answer: object) -> int | None:
    if isinstance(answer, list):  # a stream: its usage chunk, if the client asked for one
        answer = next((chunk for chunk in answer if chunk.usage), None)
    usage = getattr(answer, "usage", None)
    return usage.total_tokens if usage else None


def _workload(api: openai.OpenAI) -> list[Callable[[], object]]:
    chat, complete = api.chat.completions.create, api.completions.create
    steps: list[Callable[[], object]] = []
    for model in ("llama-2-7b-chat", "vicuna-7b-v1.3"):  # native template; rendered by the gateway
        steps += [
            lambda m=model: chat(model=m, messages=CHAT, max_tokens=7, extra_body=EOS_OFF),
            lambda m=model: chat(model=m, messages=CHAT, max_tokens=5, n=2, extra_body=EOS_OFF),
            lambda m=model: list(chat(model=m, messages=CHAT, max_tokens=6, stream=True, extra_body=EOS_OFF)),
            lambda m=model: list(chat(model=m, messages=CHAT, max_tokens=4, stream=True, n=2, extra_body=EOS_OFF,
                                      stream_options={"include_usage": True})),
            lambda m=model: chat(model=m, messages=CHAT, max_tokens=40),  # may stop early
        ]
    return steps + [
        lambda: complete(model="llama-2-7b", prompt=["one two", "three four five"], max_tokens=3),
        lambda: complete(model="llama-2-7b", prompt=[5, 6, 7, 8], max_tokens=4, extra_body=EOS_OFF),
        lambda: list(complete(model="llama-2-7b", prompt="six seven", max_tokens=5, stream=True)),
        lambda: complete(model="llama-2-7b", prompt="eight", extra_body=EOS_OFF),  # 16 tokens by default
    ]


def test_tokens_charged_match_the_engines_count(gateway: Server, vllm_fleet: dict[str, Server]) -> None:
    engine = vllm_fleet["tiny-llama"]
    api = client_for(gateway, METERED_KEY)  # this test's tenant alone: its window holds this workload only
    engine_count = 0.0
    for step in _workload(api):
        before = _engine_tokens(engine)
        answer = step()
        usage = _usage_of(answer)
        engine_count += usage if usage is not None else _engine_tokens(engine) - before
    time.sleep(1)  # streams reconcile as they close
    probe = httpx.post(gateway.url + "/v1/completions", headers={"authorization": f"Bearer {METERED_KEY}"},
                       json={"model": "llama-2-7b", "prompt": "x", "max_tokens": 1}, timeout=60)
    assert probe.status_code == 200
    charged = METERED_TPM - int(probe.headers["x-ratelimit-remaining-tokens"]) - 1  # the probe reserves 1
    print(f"the engine counted {engine_count:.0f} tokens, the gateway charged {charged}")
    assert engine_count > 300
    assert charged == pytest.approx(engine_count, rel=0.01)
