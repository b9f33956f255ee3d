"""Schemathesis hooks that make OpenAI's spec a useful fuzzer for the gateway.

Loaded by `schemathesis run` through SCHEMATHESIS_HOOKS=tests.openai_spec.hooks (see
tests/test_openai_spec_fuzz.py). Settings come from the environment, so the test controls the pass:

- FUZZ_SERVED_MODEL: the model id the gateway serves (default `smollm2-135m-instruct`);
- FUZZ_FORCE_STREAM=1: every generation request gets `stream: true` (schemathesis rarely sets it);
- FUZZ_MAX_TOKENS: the cap on generated tokens (default 8; /responses: at least its minimum, 16).

/responses: stored responses are read back by their real ids too (ids the run created replace generated
ones in every other GET/DELETE), so 200 answers of those operations are checked, not only 404s.
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

GENERATION_PATHS = ("/chat/completions", "/completions", "/responses")
# (path, method) of the operations the test selects.
OPERATIONS = (("/chat/completions", "post"), ("/completions", "post"), ("/models", "get"),
              ("/models/{model}", "get"), ("/responses", "post"), ("/responses/{response_id}", "get"),
              ("/responses/{response_id}", "delete"), ("/responses/{response_id}/input_items", "get"))
RESPONSE_MIN_OUTPUT_TOKENS = 16  # the spec's minimum for max_output_tokens
_CREATED: list[str] = []  # ids of responses the run created (stored), newest last
_CALLS = [0]
_SERVED = [0]
SERVED_PER_PASS = 60  # /responses requests made servable; each generates 16 tokens on a CPU model
# The spec documents 200 (and 429) only. Every status the gateway may answer with is declared with
# the spec's own ErrorResponse, so status_code_conformance flags anything else (500, 502, ...) and
# response_schema_conformance checks each error body is OpenAI's {"error": {message, type, param, code}}.
ERROR_STATUSES = ("400", "401", "403", "404", "405", "413", "422", "429", "503")
ERROR_RESPONSE = {"$ref": "#/components/schemas/ErrorResponse"}


@schemathesis.hook
def before_load_schema(context: Any, raw_schema: dict[str, Any]) -> None:
    schemas = raw_schema["components"]["schemas"]
    _pin_model(raw_schema, schemas)
    # DELETE /responses/{id} documents its 404 as the bare `Error` object; OpenAI answers it (and the SDK
    # reads it) in the `{"error": {...}}` envelope of every other error.
    raw_schema["paths"]["/responses/{response_id}"]["delete"]["responses"].pop("404", None)
    for path, method in OPERATIONS:
        responses = raw_schema["paths"][path][method]["responses"]
        for status in ERROR_STATUSES:
            responses.setdefault(status, {
                "description": f"OpenAI error envelope ({status})",
                "content": {"application/json": {"schema": ERROR_RESPONSE}},
            })
    _stream_schemas(raw_schema, schemas)
    _explicit_discriminators(schemas)


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
    schemas["ResponseProperties"]["properties"]["model"] = pinned  # CreateResponse's (and Response's) model
    for parameter in raw_schema["paths"]["/models/{model}"]["get"]["parameters"]:
        if parameter["name"] == "model":
            parameter["schema"] = pinned


def _explicit_discriminators(schemas: dict[str, Any]) -> None:
    """Give each `discriminator` without a `mapping` the one its members' own `type` values spell.

    Without a mapping, OpenAPI reads a discriminator's values as schema names: `OutputItem`'s would be
    "OutputMessage", ..., where OpenAI (and the spec's own member schemas) say `"type": "message"`, so
    schemathesis would flag every Responses object as an unknown discriminator value."""
    def values(schema: Any, name: str, depth: int = 0) -> list[str]:
        if not isinstance(schema, dict) or depth > 8:
            return []
        if "$ref" in schema:
            return values(schemas.get(schema["$ref"].rsplit("/", 1)[-1]), name, depth + 1)
        prop = (schema.get("properties") or {}).get(name) or {}
        found = list(prop.get("enum") or ([prop["const"]] if "const" in prop else []))
        for part in schema.get("allOf") or ():
            found += values(part, name, depth + 1)
        return found

    def visit(schema: Any) -> None:
        if isinstance(schema, list):
            for item in schema:
                visit(item)
            return
        if not isinstance(schema, dict):
            return
        discriminator = schema.get("discriminator")
        if isinstance(discriminator, dict) and "mapping" not in discriminator:
            mapping = {}
            for member in schema.get("oneOf") or schema.get("anyOf") or ():
                for value in values(member, discriminator.get("propertyName", "")):
                    if isinstance(value, str) and "$ref" in member:
                        mapping.setdefault(value, member["$ref"])
            if mapping:
                discriminator["mapping"] = mapping
        for value in schema.values():
            visit(value)

    visit(schemas)


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

    content = raw_schema["paths"]["/responses"]["post"]["responses"]["200"]["content"]
    content["text/event-stream"] = {"schema": {  # named events, each a JSON event object; no [DONE]
        "type": "object", "required": ["data", "event"],
        "properties": {"data": {"type": "string", "contentMediaType": "application/json",
                                "contentSchema": {"$ref": "#/components/schemas/ResponseStreamEvent"}}},
    }}
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
    _CALLS[0] += 1
    if "response_id" in (case.path_parameters or {}) and _CREATED and _CALLS[0] % 2:
        case.path_parameters["response_id"] = _CREATED[_CALLS[0] % len(_CREATED)]
    if case.operation.path not in GENERATION_PATHS or not isinstance(case.body, dict):
        return
    body = case.body
    if FORCE_STREAM:
        body["stream"] = True
    if case.operation.path == "/responses":
        # Every fourth request, up to a budget per pass: only what a text model can serve, so that it reaches
        # the engine (hardly any generated one does: most ask for tools or prompt templates, each a 400).
        if _CALLS[0] % 4 == 0 and _SERVED[0] < SERVED_PER_PASS:
            _SERVED[0] += 1
            _servable(body)
        _cap_response(body)
        return
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


# Features no model here has (each a 400 naming it, which the other half of the requests checks), and a
# chain id the run never created (a 404).
_UNSERVABLE = ("prompt", "tools", "tool_choice", "reasoning", "include", "background", "conversation",
               "context_management", "top_logprobs", "service_tier", "moderation", "previous_response_id")


def _servable(body: dict[str, Any]) -> None:
    for name in _UNSERVABLE:
        body.pop(name, None)
    body["model"] = SERVED_MODEL
    if isinstance(body.get("text"), dict):
        body["text"].pop("verbosity", None)
    items = body.get("input")
    if isinstance(items, list):
        body["input"] = [item for item in items if isinstance(item, dict) and item.get("type", "message") == "message"
                         and (isinstance(item.get("content"), str) or isinstance(item.get("content"), list) and all(
                             isinstance(part, dict) and part.get("type") in ("input_text", "output_text")
                             for part in item["content"]))] or "Hi"
    elif not isinstance(items, str):
        body["input"] = "Hi"


def _cap_response(body: dict[str, Any]) -> None:
    cap = max(MAX_TOKENS, RESPONSE_MIN_OUTPUT_TOKENS)
    value = body.get("max_output_tokens")
    if value is None or _is_whole_number(value) and value > cap:
        body["max_output_tokens"] = cap
    items = body.get("input")
    if isinstance(items, list) and items and isinstance(items[-1], dict) and items[-1].get("role") != "user":
        items.append({"role": "user", "content": "Hi"})  # as for chat: a conversation ends with the user


@schemathesis.hook
def after_call(context: Any, case: Any, response: Any) -> None:
    if case.operation.path != "/responses" or response.status_code != 200:
        return
    try:
        created = response.json()
    except ValueError:  # a stream: its id is in the first event
        text = response.text
        start = text.find('"id":"resp_')
        created = {"id": text[start + 6:text.find('"', start + 6)]} if start >= 0 else {}
    if isinstance(created, dict) and str(created.get("id", "")).startswith("resp_"):
        _CREATED.append(created["id"])
        del _CREATED[:-50]


def _is_whole_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or isinstance(value, float) and value.is_integer()
