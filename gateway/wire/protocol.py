"""The OpenAI wire schema the gateway accepts and returns, as plain pydantic models in one place.

Field names, types and bounds follow OpenAI's published spec (github.com/openai/openai-openapi; the
copy the tests fuzz with is tests/openai_spec/openai-openapi.yaml). Types are OpenAI's, not Python's
lax coercions: `"stream": "false"` or `"max_tokens": "100"` is a 400, as OpenAI answers, because the
gateway forwards what it validated and must read it the way the engine will.

Besides the spec, a request may carry engine sampling extras (`SAMPLING_EXTRAS`, honoured by the
engines that know them) and, for tenants that list them (`engine_extras:` in tenants.yaml), the
expensive or cross-tenant knobs of `PRIVILEGED_EXTRAS`. Anything else is a 400 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt,
                      StrictStr, StringConstraints)
from pydantic_core import PydanticCustomError


# Free-form JSON (schemas, tool definitions, engine knobs) is bounded: deep nesting costs the engine's
# JSON encoder and grammar compiler, and nothing legitimate nests this deep.
MAX_JSON_DEPTH = 32


def _integral(value: float) -> int:
    """JSON Schema's integer: 3.0 is one, 3.5 is not."""
    if not value.is_integer():
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return int(value)


def _depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise PydanticCustomError("json_depth", f"nested deeper than {limit} levels")
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _bounded(value: Any) -> Any:
    _depth(value)
    return value


# A JSON integer: an int (validated in pydantic-core, fast for long token-id lists), or a float with no
# fractional part ("3.0"); never a string or a bool.
Integer = StrictInt | Annotated[StrictFloat, AfterValidator(_integral)]
Number = StrictFloat | StrictInt  # JSON numbers; an int stays an int on the way to the engine
Bool = StrictBool
Text = StrictStr
JSONObject = Annotated[dict[str, Any], AfterValidator(_bounded)]
JSONValue = Annotated[Any, AfterValidator(_bounded)]
StopText = Annotated[StrictStr, Field(min_length=1)]  # "" stops vLLM with a 400 and llama.cpp at once
Stop = StopText | Annotated[list[StopText], Field(max_length=4)] | None
TokenIds = Annotated[list[Integer], Field(min_length=1)]
TokenIdKey = Annotated[StrictStr, StringConstraints(pattern=r"^[0-9]{1,10}$")]  # logit_bias: {"50256": -100}

# Engine extensions outside the spec that only shape sampling: cheap, per request, no other tenant
# affected. Each engine's translator (gateway.backends.requests) says which of them it honours.
SAMPLING_EXTRAS = frozenset({
    "top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids",
    "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
})
# Engine knobs that cost the shared engine more than a request's tokens (grammar compilation, prompt
# logprobs over the whole context, scheduling priority over other tenants, custom templates, KV
# transfer): only tenants that list them in `engine_extras:` may send them.
PRIVILEGED_EXTRAS = frozenset({
    "priority", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
    "structured_outputs", "chat_template", "chat_template_kwargs", "prompt_logprobs", "vllm_xargs",
    "kv_transfer_params", "grammar",
})
_EXTRAS = SAMPLING_EXTRAS | PRIVILEGED_EXTRAS


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class StreamOptions(_Part):
    include_usage: Bool | None = None
    include_obfuscation: Bool | None = None


class ContentPart(_Part):
    type: Text
    text: Text | None = None
    refusal: Text | None = None


class ChatMessage(_Part):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    refusal: Text | None = None
    tool_calls: list[JSONObject] | None = None
    function_call: JSONObject | None = None
    tool_call_id: Text | None = None


# Lists a request may carry, at most this long: counted before their items are validated, so a 4 MiB
# list of numbers costs a len(), not seconds of the event loop (longer than any context here).
# gateway.wire.validation checks them before the model is validated.
MAX_ITEMS = {"prompt": 32_768, "messages": 2_048, "stop_token_ids": 256, "logit_bias": 1_024,
             "guided_choice": 1_024, "tools": 128, "functions": 128,
             "input": 2_048, "include": 32, "context_management": 16}  # the last three: /v1/responses


class _Request(BaseModel):
    # forbid: an argument the gateway does not know is a 400 naming it, as OpenAI answers.
    model_config = ConfigDict(extra="forbid")

    model: Text
    frequency_penalty: Number | None = Field(default=None, ge=-2, le=2)
    presence_penalty: Number | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[TokenIdKey, Annotated[Number, Field(ge=-100, le=100)]] | None = None
    n: Integer | None = Field(default=None, ge=1, le=128)
    seed: Integer | None = None
    stop: Stop = None
    stream: Bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, ge=0, le=1)
    user: Text | None = None
    # Sampling extras (SAMPLING_EXTRAS).
    top_k: Integer | None = Field(default=None, ge=-1)
    min_p: Number | None = Field(default=None, ge=0, le=1)
    repetition_penalty: Number | None = Field(default=None, gt=0, le=2)
    ignore_eos: Bool | None = None
    min_tokens: Integer | None = Field(default=None, ge=0)
    stop_token_ids: list[Integer] | None = None
    include_stop_str_in_output: Bool | None = None
    skip_special_tokens: Bool | None = None
    spaces_between_special_tokens: Bool | None = None
    # Privileged extras (PRIVILEGED_EXTRAS).
    priority: Integer | None = None
    guided_json: JSONValue = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None
    guided_decoding_backend: Text | None = None
    structured_outputs: JSONObject | None = None
    prompt_logprobs: Integer | None = Field(default=None, ge=0, le=20)
    vllm_xargs: JSONObject | None = None
    kv_transfer_params: JSONObject | None = None
    grammar: Text | None = None

    @property
    def extras(self) -> set[str]:
        """The non-spec fields this request sets (to a value; null means unset)."""
        return {name for name in self.model_fields_set & _EXTRAS if getattr(self, name) is not None}


class ChatCompletionRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Integer | None = Field(default=None, ge=1)
    max_completion_tokens: Integer | None = Field(default=None, ge=1)
    logprobs: Bool | None = None
    top_logprobs: Integer | None = Field(default=None, ge=0, le=20)
    response_format: JSONObject | None = None
    tools: list[JSONObject] | None = None
    tool_choice: Text | JSONObject | None = None
    parallel_tool_calls: Bool | None = None
    functions: list[JSONObject] | None = None
    function_call: Text | JSONObject | None = None
    # Spec fields that mean nothing to a self-hosted engine: accepted, never forwarded.
    store: Bool | None = None
    metadata: dict[str, Text] | None = None
    service_tier: Text | None = None
    safety_identifier: Text | None = None
    prompt_cache_key: Text | None = None
    prompt_cache_retention: Text | None = None
    prompt_cache_options: JSONObject | None = None
    prediction: JSONObject | None = None
    # Spec fields no model here can honour (a 400 when set; see gateway.prompts.prepare).
    modalities: list[Text] | None = None
    audio: JSONObject | None = None
    reasoning_effort: Text | None = None
    verbosity: Text | None = None
    web_search_options: JSONObject | None = None
    moderation: JSONObject | None = None
    # Privileged, chat only.
    chat_template: Text | None = None
    chat_template_kwargs: JSONObject | None = None


class CompletionRequest(_Request):
    prompt: Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[
        list[TokenIds], Field(min_length=1)]
    max_tokens: Integer | None = Field(default=None, ge=0)
    best_of: Integer | None = Field(default=None, ge=0, le=20)
    echo: Bool | None = None
    logprobs: Integer | None = Field(default=None, ge=0, le=5)
    suffix: Text | None = None


class ModelHardware(BaseModel):
    fp16_weight_gb: float
    min_gpu: str
    tensor_parallel_size: int
    cpu_fallback_realistic: bool


class ModelCard(BaseModel):
    """OpenAI's `model` object plus what a platform team needs to choose a model."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    family: str
    license: str
    license_name: str
    commercial_use: str
    license_conditions: list[str]
    context_length: int
    architecture: str
    hardware: ModelHardware
    # Whether this gateway can serve it now: "ready", "unreachable", "unknown" (not probed yet) or
    # "no_backends" (the registry configures none where this gateway runs).
    availability: Literal["ready", "unreachable", "unknown", "no_backends"]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
