"""The OpenAI wire schema the gateway accepts and returns, as plain pydantic models in one place.

Request models only *validate*: the gateway forwards the client's own JSON (with `model` and a few
gateway-owned fields changed), so unknown engine extensions (`top_k`, `ignore_eos`,
`repetition_penalty`, ...) pass through untouched and nothing is re-serialised needlessly.
Field constraints follow OpenAI's spec (shared/reference/openai-openapi.yaml).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Stop = str | Annotated[list[str], Field(max_length=4)] | None


class _Request(BaseModel):
    # extra="allow": vLLM/llama.cpp sampling extensions are the engine's business, not ours.
    model_config = ConfigDict(extra="allow")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class _Sampling(_Request):
    model: str
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, le=128)
    seed: int | None = None
    stop: Stop = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = Field(default=None, ge=0, le=20)
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None


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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
