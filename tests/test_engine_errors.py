"""An engine's answer to a request it found invalid is the client's 400, in OpenAI's shape, without the
engine's paths or traceback; a real engine fault stays a 502. Bodies are verbatim from the engines
(llama-cpp-python 0.3.36's server and vLLM 0.32.0), captured by sending the requests directly."""

from __future__ import annotations

import orjson
import pytest

from gateway.backends.engines import ENGINE_PROFILES
from gateway.backends.relay import clean_engine_message, upstream_error
from gateway.registry.schema import Engine

LLAMA_CPP = ENGINE_PROFILES[Engine.LLAMA_CPP].rejects_with_500
VLLM = ENGINE_PROFILES[Engine.VLLM].rejects_with_500


def _llama_cpp_500(message: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": "internal_server_error", "param": None,
                                   "code": None}})


VALIDATION = ("1 validation error:\n  {'type': 'float_type', 'loc': ('body', 'temperature'), 'msg': 'Input should "
              "be a valid number', 'input': None}\n\n  File \"/srv/app/.venv/lib/python3.11/site-packages/llama_cpp/"
              "server/app.py\", line 376, in create_chat_completion\n    body: CreateChatCompletionRequest,")


@pytest.mark.parametrize("message", [
    VALIDATION,
    "argument 5: TypeError: wrong type",  # a null presence_penalty reaching ctypes
    "invalid literal for int() with base 10: 'abc'",  # logit_bias keys
    'can only concatenate str (not "list") to str',  # content parts in its chat template
    "",  # a failed assert on the prompt list
])
def test_llama_cpp_validation_500s_are_the_clients_400(message: str) -> None:
    error = upstream_error(500, _llama_cpp_500(message), LLAMA_CPP)
    assert error.status == 400 and error.type == "invalid_request_error"
    assert "/srv/app" not in error.message and "site-packages" not in error.message and "File" not in error.message


def test_a_real_engine_fault_stays_a_502() -> None:
    error = upstream_error(500, _llama_cpp_500("llama_decode returned -3"), LLAMA_CPP)
    assert error.status == 502 and error.code == "upstream_error"
    assert upstream_error(500, b"Internal Server Error", LLAMA_CPP).status == 502
    assert upstream_error(500, _llama_cpp_500(""), VLLM).status == 502  # only llama.cpp speaks so


def test_vllm_400s_keep_their_param() -> None:
    body = orjson.dumps({"error": {"message": "max_tokens=100000 cannot be greater than max_model_len=512.",
                                   "type": "BadRequestError", "param": "max_tokens", "code": 400}})
    error = upstream_error(400, body, VLLM)
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", "max_tokens")


def test_tracebacks_and_paths_are_cut_from_engine_messages() -> None:
    cleaned = clean_engine_message("boom\nTraceback (most recent call last):\n  File \"/opt/x/y.py\", line 3")
    assert cleaned == "boom"
    assert "<path>" in clean_engine_message("cannot open /home/engine/models/x.gguf")
