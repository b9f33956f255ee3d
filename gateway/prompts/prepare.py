"""Turn a validated client request into the engine-neutral call: which endpoint, which fields, which prompt.

The payload is built from the *validated* request (never the client's raw JSON): spec fields with the
spec's types, nulls dropped, text parts flattened, fields that mean nothing to a self-hosted engine
left out, and fields no model here can honour refused with a 400. Each engine's translator
(`gateway.backends.requests`) then renames and checks what its engine takes.

Chat to a model whose engine template is right (`native_chat_template`) is forwarded as chat; the
engine applies its template. Every other chat is rendered here with the model's prompt format and
sent to the engine's `/v1/completions`; the answer is translated back (`Reply.CHAT_FROM_COMPLETION`).
Either way the format's stop strings are added, except those that only repeat the tokenizer's EOS
(the engine stops there anyway, and vLLM holds back `len(stop) - 1` characters of every stream while a
stop string could still match).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from gateway.errors import GatewayError
from gateway.prompts.formats import FORMATS, PromptFormat
from gateway.prompts.messages import refuse_control_strings, to_turns
from gateway.registry.schema import Model
from gateway.wire.protocol import ChatCompletionRequest, CompletionRequest

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"

# Spec fields an engine has no use for: accepted from the client, never forwarded.
_NOT_FORWARDED = frozenset({
    "model", "user", "store", "metadata", "service_tier", "safety_identifier", "prompt_cache_key",
    "prompt_cache_retention", "prompt_cache_options", "prediction", "parallel_tool_calls", "messages",
    "max_completion_tokens", "stream_options", "tools", "tool_choice", "functions", "function_call",
    "modalities",
})
# Spec fields no model of the ten families can honour: a 400 when set rather than a silent no-op.
_UNSUPPORTED = {
    "audio": "audio output", "reasoning_effort": "reasoning effort", "verbosity": "verbosity",
    "web_search_options": "web search", "moderation": "moderation",
}
# Chat fields a completions endpoint takes under another shape (set by _as_completion).
_CHAT_ONLY = ("logprobs", "top_logprobs", "response_format", "chat_template", "chat_template_kwargs")


class Reply(Enum):
    AS_IS = "as-is"  # the engine answers in the client's shape already
    CHAT_FROM_COMPLETION = "chat-from-completion"


@dataclass
class UpstreamCall:
    path: str
    payload: dict[str, Any]  # engine-neutral: validated spec fields and allowed extras, no nulls
    prompt_text: str | None  # the prompt as text when known (token counting, context check)
    reply: Reply = Reply.AS_IS
    session: str | None = None  # the client's `user`, for session affinity only
    include_usage: bool = False  # the client asked for the usage chunk of a stream
    # Tokens an engine-side chat template may add beyond the gateway's own rendering (native templates:
    # a default system turn, role tokens per message).
    template_margin: int = 0
    # A bridge's own stream translator stacked on the engine's (gateway.backends.translate.Translator ->
    # Translator): the Responses API reads the engine's events in the relay's one pass over them.
    restyle_stream: Callable[[Any], Any] | None = None

    @property
    def stream(self) -> bool:
        return bool(self.payload.get("stream"))

    @property
    def prompt_bound(self) -> int:
        """The most prompt tokens the engine can count for this call, all prompts of a batch together
        (token ids exactly): the reservation may never be below what the engine will charge."""
        return sum(self.prompt_bounds)

    @functools.cached_property
    def prompt_bounds(self) -> list[int]:
        """Per prompt: token ids exactly; text by its UTF-8 size plus a margin. Byte-level BPE (GPT-2,
        Llama 3, SmolLM) never makes more tokens than bytes, SentencePiece with byte fallback (Llama,
        Vicuna) at most one more per text (its word-start piece); the margin covers BOS/EOS and the
        turn tokens of an engine-side chat template. Characters / 4 undercounted digits, CJK, emoji and
        rare scripts 4-13x (a quota could be overrun that much)."""
        if self.prompt_text is not None:
            return [text_bound(self.prompt_text) + self.template_margin]
        prompt = self.payload.get("prompt")
        if not isinstance(prompt, list) or not prompt:
            return [text_bound(prompt)] if isinstance(prompt, str) else [0]
        if isinstance(prompt[0], int):
            return [len(prompt)]
        return [len(p) if isinstance(p, list) else text_bound(p) if isinstance(p, str) else 0 for p in prompt]

    @property
    def max_tokens(self) -> int | None:
        return self.payload.get("max_tokens")

    def reservation(self, context_length: int) -> int:
        """The most tokens this call may cost (an upper bound of the engine's own count): per prompt, its
        bound plus every completion it can generate (`n` choices, or `best_of` generated to pick them),
        and never more than the context holds per choice (prompt + completion <= context). Without a
        limit a chat may fill the context; completions default to 16 tokens, as OpenAI's and the
        engines' do."""
        per_choice = self.max_tokens
        if per_choice is None:
            per_choice = 16 if self.path == COMPLETIONS_PATH and self.reply is Reply.AS_IS else context_length
        choices = max(self.payload.get("n") or 1, self.payload.get("best_of") or 1)
        ceiling = choices * context_length
        return sum(min(bound + per_choice * choices, ceiling) for bound in self.prompt_bounds)


# An engine-side chat template renders the turns itself: the gateway's rendering of the same format is
# the estimate, and these margins cover what a template may add (a default system turn of up to ~40
# tokens, as SmolLM2's does, and role and separator tokens per turn).
NATIVE_TEMPLATE_MARGIN = 64
NATIVE_TURN_MARGIN = 8
# Tokens an engine adds around a text prompt at most: BOS, a word-start piece, EOS.
TEXT_MARGIN_TOKENS = 4


def text_bound(text: str) -> int:
    """Upper bound of a text's tokens in any tokenizer the registry's engines use (see prompt_bounds)."""
    return len(text.encode("utf-8", "surrogatepass")) + TEXT_MARGIN_TOKENS


def prepare_chat(model: Model, request: ChatCompletionRequest, default_max_tokens: int | None = None) -> UpstreamCall:
    if model.prompt_format == "none" and not model.allow_chat_without_format:
        raise GatewayError(
            400,
            f"`{model.id}` is a base model without a chat format; send plain text to /v1/completions.",
            param="model",
            code="chat_not_supported",
        )
    prompt_format = FORMATS[model.prompt_format]
    turns = to_turns(request.messages)
    refuse_control_strings(turns, prompt_format.controls)
    payload = _forwarded(request)
    _refuse_tools(request)
    limit = request.max_completion_tokens or request.max_tokens or default_max_tokens
    if limit is not None:
        payload["max_tokens"] = limit
    _add_stops(payload, model, prompt_format)
    if model.native_chat_template:
        # The engine's template decides which conversations it takes; the 2023 rules are not ours to add.
        prompt = prompt_format.render(turns, model.default_system_prompt, strict=False)
        payload["messages"] = [{"role": turn.role, "content": turn.content} for turn in turns]
        call = _call(CHAT_PATH, payload, prompt, Reply.AS_IS, request)
        call.template_margin = NATIVE_TEMPLATE_MARGIN + NATIVE_TURN_MARGIN * len(turns)
        return call
    prompt = prompt_format.render(turns, model.default_system_prompt)
    return _call(COMPLETIONS_PATH, _as_completion(payload, prompt, limit), prompt,
                 Reply.CHAT_FROM_COMPLETION, request)


def prepare_completion(model: Model, request: CompletionRequest,
                       default_max_tokens: int | None = None) -> UpstreamCall:
    payload = _forwarded(request)
    if default_max_tokens is not None and "max_tokens" not in payload:
        payload["max_tokens"] = default_max_tokens
    prompt = request.prompt
    return _call(COMPLETIONS_PATH, payload, prompt if isinstance(prompt, str) else None, Reply.AS_IS, request)


def _call(path: str, payload: dict[str, Any], prompt: str | None, reply: Reply,
          request: ChatCompletionRequest | CompletionRequest) -> UpstreamCall:
    options = request.stream_options
    include_usage = bool(request.stream and options is not None and options.include_usage)
    return UpstreamCall(path, payload, prompt, reply, session=request.user, include_usage=include_usage)


def _forwarded(request: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    payload = {}
    for name in request.model_fields_set:
        value = getattr(request, name)
        if value is None or name in _NOT_FORWARDED:
            continue
        if name in _UNSUPPORTED:
            raise _unsupported(name, f"{_UNSUPPORTED[name]} is not supported by the models this gateway serves")
        payload[name] = value
    modalities = getattr(request, "modalities", None)
    if modalities and set(modalities) != {"text"}:
        raise _unsupported("modalities", "only text output is supported by the models this gateway serves")
    if isinstance(payload.get("response_format"), dict) and payload["response_format"].get("type") == "text":
        del payload["response_format"]  # the default
    return payload


def _refuse_tools(request: ChatCompletionRequest) -> None:
    """None of the ten families was tuned for tool calling; `tool_choice: "none"` just drops the tools."""
    if request.tools and request.tool_choice != "none":
        raise _unsupported("tools", "tool calling is not supported by this model")
    if request.functions and request.function_call != "none":
        raise _unsupported("functions", "function calling is not supported by this model")


def _add_stops(payload: dict[str, Any], model: Model, prompt_format: PromptFormat) -> None:
    stop = payload.get("stop")
    client_stops = [stop] if isinstance(stop, str) else list(stop or ())
    added = [s for s in prompt_format.stop if s not in client_stops and s != prompt_format.eos]
    if client_stops or added:
        payload["stop"] = client_stops + added
    if model.stop_token_ids:
        payload["stop_token_ids"] = list(dict.fromkeys([*payload.get("stop_token_ids", ()),
                                                         *model.stop_token_ids]))


def _as_completion(payload: dict[str, Any], prompt: str, limit: int | None) -> dict[str, Any]:
    completion = {key: value for key, value in payload.items() if key not in _CHAT_ONLY}
    completion["prompt"] = prompt
    # Chat without a limit means "until the context is full"; completions endpoints default to 16
    # tokens instead, so say explicitly that there is no limit (vLLM and llama.cpp read null so).
    completion["max_tokens"] = limit
    if payload.get("logprobs"):  # chat's bool + top_logprobs -> completions' int
        completion["logprobs"] = payload.get("top_logprobs") or 1
    if "response_format" in payload:
        raise _unsupported("response_format", "response_format is not supported by this model's prompt format")
    if payload.get("chat_template") or payload.get("chat_template_kwargs"):
        raise _unsupported("chat_template", "this model's chat is rendered by the gateway, not by a template")
    return completion


def _unsupported(param: str, why: str) -> GatewayError:
    return GatewayError(400, f"Unsupported parameter '{param}': {why}.", param=param,
                        code="unsupported_parameter")
