"""What differs between the OpenAI-compatible engines we speak to, in one table.

The gateway absorbs these differences so that every client sees the same API: e.g. llama.cpp's
server ignores `stream_options.include_usage`, so the gateway adds the usage chunk itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.registry.schema import Engine


@dataclass(frozen=True)
class EngineProfile:
    health_path: str
    # Does the engine send the final `usage` chunk when a stream asks for `include_usage`?
    sends_stream_usage: bool
    # Tokenizer endpoint answering {"count": n}, and the body field that carries the text.
    tokenize_path: str | None
    tokenize_field: str = "prompt"
    # Does a non-streamed chat message carry OpenAI's `refusal: null`? (The gateway adds it if not.)
    chat_has_refusal: bool = True
    # An engine 500 whose message matches is its answer to an invalid request (a client 400).
    rejects_with_500: re.Pattern[str] | None = None


# llama-cpp-python 0.3.36 answers invalid input with a 500 carrying the exception's text (measured for
# every spec-valid shape it cannot take): its own pydantic validation ("1 validation error: ..." with its
# file paths), ctypes' "argument 5: TypeError: wrong type" (null penalties), "invalid literal for int()"
# (logit_bias keys), its chat template's "can only concatenate", and an empty message (a failed assert
# on the prompt list). Real engine faults (a crash, a broken connection) never arrive as such a 500.
_LLAMA_CPP_INPUT_ERRORS = (r"^\d+ validation errors?:|TypeError|invalid literal for int\(\)|"
                           r"can only concatenate|^$")

ENGINE_PROFILES: dict[Engine, EngineProfile] = {
    Engine.VLLM: EngineProfile(health_path="/health", sends_stream_usage=True, tokenize_path="/tokenize"),
    # llama-cpp-python's server (0.3.36, measured) has no /health (404), ignores include_usage, and
    # every API route (/v1/models included) takes the model lock: a probe there waits behind a whole
    # generation, or, with its default interrupt_requests=true, cuts another client's stream short.
    # /docs is answered by the same server process without the lock: a liveness probe that disturbs nothing.
    Engine.LLAMA_CPP: EngineProfile(
        health_path="/docs", sends_stream_usage=False, tokenize_path="/extras/tokenize/count",
        tokenize_field="input", chat_has_refusal=False, rejects_with_500=re.compile(_LLAMA_CPP_INPUT_ERRORS),
    ),
    Engine.SEQ2SEQ: EngineProfile(health_path="/health", sends_stream_usage=True, tokenize_path="/tokenize"),
}


def profile_of(engine: Engine) -> EngineProfile:
    return ENGINE_PROFILES[engine]
