"""Schemathesis hooks that make OpenAI's spec a useful fuzzer for the gateway.

Loaded by `schemathesis run` through SCHEMATHESIS_HOOKS=tests.openai_spec.hooks (see
tests/test_openai_spec_fuzz.py). Settings come from the environment, so the test controls the pass:

- FUZZ_SERVED_MODEL: the model id the gateway serves (default `smollm2-135m-instruct`);
- FUZZ_FORCE_STREAM=1: every generation request gets `stream: true` (schemathesis rarely sets it);
- FUZZ_MAX_TOKENS: the cap on generated tokens (default 8).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import schemathesis

SERVED_MODEL = os.environ.get("FUZZ_SERVED_MODEL", "smollm2-135m-instruct")
FORCE_STREAM = os.environ.get("FUZZ_FORCE_STREAM") == "1"
MAX_TOKENS = int(os.environ.get("FUZZ_MAX_TOKENS", "8"))
MAX_CHOICES = 2

GENERATION_PATHS = ("/chat/completions", "/completions")
# (path, method) of the operations the test selects.
OPERATIONS = (("/chat/completions", "post"), ("/completions", "post"), ("/models", "get"),
              ("/models/{model}", "get"))
# The spec documents 200 (and 429) only. Every status the gateway may answer with is declared with
# the spec's own ErrorResponse, so status_code_conformance flags anything else (500, 502, ...) and
# response_schema_conformance checks each error body is OpenAI's {"error": {message, type, param, code}}.
ERROR_STATUSES = ("400", "401", "403", "404", "405", "413", "422", "429", "503")
ERROR_RESPONSE = {"$ref": "#/components/schemas/ErrorResponse"}


@schemathesis.hook
def before_load_schema(context: Any, raw_schema: dict[str, Any]) -> None:
    schemas = raw_schema["components"]["schemas"]
    _pin_model(raw_schema, schemas)
    for path, method in OPERATIONS:
        responses = raw_schema["paths"][path][method]["responses"]
        for status in ERROR_STATUSES:
            responses.setdefault(status, {
                "description": f"OpenAI error envelope ({status})",
                "content": {"application/json": {"schema": ERROR_RESPONSE}},
            })
    _stream_schemas(raw_schema, schemas)


def _pin_model(raw_schema: dict[str, Any], schemas: dict[str, Any]) -> None:
    """Generate only the model the gateway serves: any other id is a 404 and nothing else gets tested.
    (Negative mode still sends ids outside the enum, which checks the 404 envelope.)"""
    pinned = {"type": "string", "enum": [SERVED_MODEL]}
    chat_parts = [part for part in schemas["CreateChatCompletionRequest"]["allOf"]
                  if "model" in part.get("properties", {})]
    assert chat_parts, "CreateChatCompletionRequest has no `model` property: has the spec changed?"
    for part in chat_parts:
        part["properties"]["model"] = pinned
    schemas["CreateCompletionRequest"]["properties"]["model"] = pinned
    for parameter in raw_schema["paths"]["/models/{model}"]["get"]["parameters"]:
        if parameter["name"] == "model":
            parameter["schema"] = pinned


def _stream_schemas(raw_schema: dict[str, Any], schemas: dict[str, Any]) -> None:
    """Validate each SSE event's `data` as a JSON chunk (or the final `[DONE]`).

    For an OpenAPI 3.1 `text/event-stream` response schemathesis applies the schema to each parsed
    *event* ({"data": str, "event": str, "id"?, "retry"?}), not to the JSON inside `data`: with the
    spec's chunk schema as is, every valid stream fails. `contentMediaType` + `contentSchema` on
    `data` make schemathesis parse the string as JSON and validate it against the chunk schema.
    """
    # The spec has no streamed /completions response. Its chunks are CreateCompletionResponse
    # objects whose `finish_reason` is null until the last one (the spec's enum has no null).
    chunk = copy.deepcopy(schemas["CreateCompletionResponse"])
    finish_reason = chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
    chunk["properties"]["choices"]["items"]["properties"]["finish_reason"] = {
        "anyOf": [finish_reason, {"type": "null"}]}
    schemas["FuzzCreateCompletionStreamResponse"] = chunk

    for path, chunk_name in (("/chat/completions", "CreateChatCompletionStreamResponse"),
                             ("/completions", "FuzzCreateCompletionStreamResponse")):
        content = raw_schema["paths"][path]["post"]["responses"]["200"]["content"]
        content["text/event-stream"] = {"schema": {
            "type": "object",
            "required": ["data"],
            "properties": {"data": {
                "type": "string",
                # if/else, not anyOf: the JSON check must not run on "[DONE]" (it is not JSON).
                "if": {"const": "[DONE]"},
                "else": {"contentMediaType": "application/json",
                         "contentSchema": {"$ref": f"#/components/schemas/{chunk_name}"}},
            }},
        }}


@schemathesis.hook
def before_call(context: Any, case: Any, **kwargs: Any) -> None:
    if case.operation.path not in GENERATION_PATHS or not isinstance(case.body, dict):
        return
    body = case.body
    if FORCE_STREAM:
        body["stream"] = True
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") != "user":
        # The gateway refuses (400) a chat that does not end with the user's turn, and most generated
        # conversations don't: without this, hardly any valid chat would reach the engine.
        messages.append({"role": "user", "content": "Hi"})
    # Keep generation cheap on a CPU model: uncapped, SmolLM2 would fill its context on every case.
    caps = {"max_tokens": MAX_TOKENS, "max_completion_tokens": MAX_TOKENS, "n": MAX_CHOICES,
            "best_of": MAX_CHOICES}
    for field, cap in caps.items():
        value = body.get(field)
        # Only whole numbers above the cap change (105.0 is an integer to JSON Schema): negative
        # mode's wrong types and values (strings, -1, 9.5) stay as generated, still to be refused.
        if _is_whole_number(value) and value > cap:
            body[field] = cap
    # Absent or null means "until the context is full" to the engine: set a cap then too.
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS


def _is_whole_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or isinstance(value, float) and value.is_integer()
