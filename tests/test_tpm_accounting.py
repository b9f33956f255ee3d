"""Tokens charged against a tenant's TPM equal what the engine itself counted, on a mixed workload.

The engine's own count is vLLM's Prometheus counters (prompt and generation tokens), which include the
streams whose clients never asked for usage. The charge is read back from the gateway's
`x-ratelimit-remaining-tokens` after the workload (a token limit that never binds).
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.conftest import METERED_KEY, METERED_TPM, client_for
from tests.support.processes import Server

CHAT = [{"role": "user", "content": "Count to five."}]


def _engine_tokens(engine: Server) -> float:
    text = httpx.get(engine.url + "/metrics").text
    wanted = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(wanted))


def _workload(api: openai.OpenAI) -> None:
    for model in ("llama-2-7b-chat", "vicuna-7b-v1.3"):  # native template; rendered by the gateway
        api.chat.completions.create(model=model, messages=CHAT, max_tokens=7, extra_body={"ignore_eos": True})
        api.chat.completions.create(model=model, messages=CHAT, max_tokens=5, n=2, extra_body={"ignore_eos": True})
        list(api.chat.completions.create(model=model, messages=CHAT, max_tokens=6, stream=True,
                                         extra_body={"ignore_eos": True}))  # no usage asked for
        list(api.chat.completions.create(model=model, messages=CHAT, max_tokens=4, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        api.chat.completions.create(model=model, messages=CHAT, max_tokens=40)  # may stop early
    api.completions.create(model="llama-2-7b", prompt=["one two", "three four five"], max_tokens=3)
    api.completions.create(model="llama-2-7b", prompt=[5, 6, 7, 8], max_tokens=4, extra_body={"ignore_eos": True})
    list(api.completions.create(model="llama-2-7b", prompt="six seven", max_tokens=5, stream=True, n=2))
    api.completions.create(model="llama-2-7b", prompt="eight", extra_body={"ignore_eos": True})  # 16 by default


def test_tokens_charged_match_the_engines_count(gateway: Server, vllm_fleet: dict[str, Server]) -> None:
    engine = vllm_fleet["tiny-llama"]
    api = client_for(gateway, METERED_KEY)  # this test's tenant alone: its window holds this workload only
    before = _engine_tokens(engine)
    _workload(api)
    time.sleep(1)  # streams reconcile as they close
    engine_count = _engine_tokens(engine) - before
    probe = httpx.post(gateway.url + "/v1/completions", headers={"authorization": f"Bearer {METERED_KEY}"},
                       json={"model": "llama-2-7b", "prompt": "x", "max_tokens": 1}, timeout=60)
    assert probe.status_code == 200
    charged = METERED_TPM - int(probe.headers["x-ratelimit-remaining-tokens"]) - 1  # the probe reserves 1
    print(f"engine counted {engine_count:.0f} tokens, the gateway charged {charged}")
    assert engine_count > 100
    assert charged == pytest.approx(engine_count, rel=0.01)
