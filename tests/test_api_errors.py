"""Every client-caused failure comes back as OpenAI's envelope with the right status, type, code, param."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import LOCAL_MODEL, RESEARCH_KEY, UNREACHABLE_MODEL
from tests.support.processes import Server

HELLO = [{"role": "user", "content": "hi"}]
AUTH = f"Bearer {RESEARCH_KEY}"


def _error_of(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    error = _error_of(caught.value)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["type"] == "invalid_request_error"
    assert "The model `gpt-4o` does not exist" in error["message"]


def test_malformed_json_is_400(gateway: Server) -> None:
    response = httpx.post(gateway.url + "/v1/chat/completions", content=b'{"model": "x", "messages": [',
                          headers={"authorization": AUTH, "content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "could not parse the JSON body" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"temperature": 5}, "temperature", "invalid_value"),
        ({"top_p": "high"}, "top_p", "invalid_type"),
        ({"n": 0}, "n", "invalid_value"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ({"max_tokens": "lots"}, "max_tokens", "invalid_type"),
    ],
)
def test_schema_violations_name_the_param(client: openai.OpenAI, extra: dict, param: str, code: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=LOCAL_MODEL, messages=HELLO, extra_body=extra)
    error = _error_of(caught.value)
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": LOCAL_MODEL}, "messages", "missing_required_parameter"),
        ({"model": LOCAL_MODEL, "messages": []}, "messages", "empty_array"),
        ({"model": LOCAL_MODEL, "messages": "hi"}, "messages", "invalid_type"),
        ({"model": LOCAL_MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role",
         "invalid_value"),
        ({"messages": HELLO}, "model", "missing_required_parameter"),
    ],
)
def test_bad_messages_name_the_param(gateway: Server, body: dict, param: str, code: str) -> None:
    response = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers={"authorization": AUTH})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code)


def test_completions_missing_prompt(gateway: Server) -> None:
    response = httpx.post(gateway.url + "/v1/completions", json={"model": LOCAL_MODEL},
                          headers={"authorization": AUTH})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"


def test_missing_api_key_is_401(gateway: Server) -> None:
    response = httpx.post(gateway.url + "/v1/chat/completions", json={"model": LOCAL_MODEL, "messages": HELLO})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_unknown_api_key_is_401_without_echoing_it(gateway: Server) -> None:
    response = httpx.get(gateway.url + "/v1/models", headers={"authorization": "Bearer sk-wrong-secret-123"})
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key" and "sk-wrong-secret-123" not in response.text


def test_every_response_carries_a_request_id(gateway: Server) -> None:
    mine = httpx.get(gateway.url + "/v1/models", headers={"authorization": AUTH, "x-request-id": "req-abc.123"})
    assert len(mine.headers["x-request-id"]) == 32  # always the gateway's own; the client's is beside it
    assert mine.headers["x-client-request-id"] == "req-abc.123"
    generated = httpx.get(gateway.url + "/v1/nowhere", headers={"authorization": AUTH})
    assert len(generated.headers["x-request-id"]) == 32 and "x-client-request-id" not in generated.headers


def test_json_access_log_carries_the_request_id(gateway: Server) -> None:
    response = httpx.get(gateway.url + "/v1/models", headers={"authorization": AUTH,
                                                              "x-client-request-id": "req-access-log-1"})
    lines = gateway.log_lines_with(response.headers["x-request-id"])
    record = json.loads(lines[-1].split("gateway.access: ", 1)[1])
    assert record["path"] == "/v1/models" and record["status"] == 200 and record["method"] == "GET"
    assert record["client_request_id"] == "req-access-log-1"


def test_unreachable_backend_is_503_with_retry_after(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client.completions.create(model=UNREACHABLE_MODEL, prompt="hello")
    assert caught.value.status_code == 503
    assert int(caught.value.response.headers["retry-after"]) > 0
    error = _error_of(caught.value)
    assert error["code"] == "backend_unavailable"
    assert UNREACHABLE_MODEL in error["message"]


def test_chat_to_a_base_model_says_use_completions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="llama-7b", messages=HELLO)
    error = _error_of(caught.value)
    assert error["code"] == "chat_not_supported" and "/v1/completions" in error["message"]


def test_unknown_route_is_an_openai_404(gateway: Server) -> None:
    response = httpx.get(gateway.url + "/v1/embeddingz", headers={"authorization": AUTH})
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_models_list_carries_license_and_hardware(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert len(models) == 51
    alpaca = models["alpaca-7b"].model_dump()
    assert alpaca["object"] == "model" and alpaca["owned_by"] == "tatsu-lab"
    assert (alpaca["license"], alpaca["commercial_use"], alpaca["context_length"]) == ("cc-by-nc-4.0", "no", 2048)
    assert alpaca["hardware"]["min_gpu"] == "1x A10G-24GB"
    falcon = client.models.retrieve("falcon-180b").model_dump()
    assert falcon["commercial_use"] == "conditional"
    assert "falcon-180b-hosting-license" in falcon["license_conditions"]
    assert falcon["hardware"]["tensor_parallel_size"] == 8


def test_retrieving_an_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("llama-4")
    assert _error_of(caught.value)["code"] == "model_not_found"


def test_health_and_ready(gateway: Server) -> None:
    assert httpx.get(gateway.url + "/health").json() == {"status": "ok", "database": "ok"}
    ready = httpx.get(gateway.url + "/ready")
    assert ready.status_code == 200 and ready.json()["models"] == 51 and ready.json()["database"] == "ok"
