"""The Responses API's request (`POST /v1/responses`), as plain pydantic models beside chat's.

Fields, types and bounds follow OpenAI's spec (`CreateResponse` in tests/openai_spec/openai-openapi.yaml),
with chat's strict JSON types (gateway.wire.protocol). What a text model can use is typed here; what none
of the ten families can do (tools, images, files, audio, reasoning, background runs, ...) is accepted in
the empty or default form the SDKs send, and refused otherwise by the bridge with a 400 that names it and
says why (gateway.responses.request). Unknown top-level fields are a 400, as in chat; unknown keys inside
input items and content parts are ignored, as in chat's messages (clients send back the output items they
were given, with fields of their own).

The response objects the gateway returns are built in gateway.responses.objects, as plain dicts: they are
serialised once, straight to the client and to the store.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from gateway.wire.protocol import Bool, Integer, JSONObject, Number, StreamOptions, Text

MetadataKey = Annotated[str, StringConstraints(strict=True, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(strict=True, max_length=512)]


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ContentPart(_Part):
    """`input_text` / `output_text` / `refusal` are read; image, file and audio parts are refused by name."""

    type: Text
    text: Text | None = None
    refusal: Text | None = None


class InputItem(_Part):
    """A message (`EasyInputMessage`, `InputMessage` or an `OutputMessage` sent back); any other item type
    (tool calls and their outputs, reasoning, item references) is refused by the bridge."""

    type: Text | None = None  # absent: a message
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: Text | list[ContentPart] | None = None
    id: Text | None = None
    status: Text | None = None


class TextFormat(_Part):
    type: Literal["text", "json_schema", "json_object"]
    name: Text | None = None
    json_schema: JSONObject | None = Field(default=None, alias="schema")
    strict: Bool | None = None
    description: Text | None = None


class TextOptions(_Part):
    format: TextFormat | None = None
    verbosity: Text | None = None


class ResponsesRequest(BaseModel):
    # forbid: an argument the gateway does not know is a 400 naming it, as OpenAI answers.
    model_config = ConfigDict(extra="forbid")

    model: Text
    input: Text | Annotated[list[InputItem], Field(min_length=1)]
    instructions: Text | None = None
    # OpenAI's minimum: fewer tokens than this leave no room for an answer.
    max_output_tokens: Integer | None = Field(default=None, ge=16)
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, ge=0, le=1)
    stream: Bool | None = None
    stream_options: StreamOptions | None = None
    store: Bool | None = None
    previous_response_id: Text | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)] | None = None  # OpenAI's caps
    user: Text | None = None
    truncation: Literal["auto", "disabled"] | None = None
    text: TextOptions | None = None
    # What the SDKs send by default: accepted as long as it asks for nothing a model here cannot do.
    tools: list[JSONObject] | None = None
    tool_choice: Text | JSONObject | None = None
    parallel_tool_calls: Bool | None = None
    max_tool_calls: Integer | None = Field(default=None, ge=0)
    include: list[Text] | None = None
    top_logprobs: Integer | None = Field(default=None, ge=0, le=20)
    reasoning: JSONObject | None = None
    service_tier: Text | None = None
    # Spec fields that mean nothing to a self-hosted engine: accepted, never forwarded.
    safety_identifier: Annotated[Text, StringConstraints(max_length=64)] | None = None
    prompt_cache_key: Text | None = None
    prompt_cache_retention: Text | None = None
    prompt_cache_options: JSONObject | None = None
    # Spec fields no model or feature here serves (a 400 when set; see gateway.responses.request).
    background: Bool | None = None
    conversation: Text | JSONObject | None = None
    prompt: JSONObject | None = None
    context_management: list[JSONObject] | None = None
    moderation: JSONObject | None = None
    # Chat's sampling extras (gateway.wire.protocol.SAMPLING_EXTRAS), with chat's bounds.
    top_k: Integer | None = Field(default=None, ge=-1)
    min_p: Number | None = Field(default=None, ge=0, le=1)
    repetition_penalty: Number | None = Field(default=None, gt=0, le=2)
    ignore_eos: Bool | None = None
    min_tokens: Integer | None = Field(default=None, ge=0)
    stop_token_ids: list[Integer] | None = None
    include_stop_str_in_output: Bool | None = None
    skip_special_tokens: Bool | None = None
    spaces_between_special_tokens: Bool | None = None
