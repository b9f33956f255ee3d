"""One request translator per engine: the engine-neutral call -> the body this engine takes.

As Envoy AI Gateway keeps one translator per format/backend pair: each engine's translator renames
what its engine calls differently, refuses what its engine cannot do (with the param and why) before
any engine is called, and forwards only the extras its engine honours. A backend whose engine cannot
take a request is skipped by the dispatcher; when no backend of the model can, the client gets the 400.

What each engine takes, measured on the versions the registry pins (vLLM 0.32 / 0.27 on CPU,
llama-cpp-python 0.3.36's server, our seq2seq worker):
- vLLM: every spec field below, batched and token-id prompts, `n`; not `suffix`, not `best_of` > `n`
  (its V1 engine dropped best_of); all sampling extras and the privileged vLLM knobs.
- llama.cpp: one text prompt per request and one choice (`n` is ignored by its server, so `n` > 1 is
  refused rather than silently answered with one choice); `repetition_penalty` is its
  `repeat_penalty`; `grammar` for tenants allowed it; `response_format` json_object on chat only.
  Its validation errors come back as 500s, and errors after a stream started as an empty stream.
- Every engine: no empty prompt, `max_tokens` >= 1 (llama.cpp reads 0 as "no limit").
- "No limit" (a chat the gateway rendered for `/v1/completions`, sent with `max_tokens: null`): llama.cpp
  reads null so; vLLM's completions endpoint reads it as its default of 16 tokens, so vLLM gets a number
  instead: the context length less the prompt's UTF-8 size, which no tokenizer exceeds (0.27 refuses a
  prompt plus `max_tokens` longer than the context; 0.32 would clamp it).
- seq2seq worker: batched and token-id prompts, `n`, `best_of` <= `n`; no logprobs, no suffix.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import GatewayError
from gateway.prompts.prepare import COMPLETIONS_PATH, UpstreamCall
from gateway.registry.schema import Engine
from gateway.wire.protocol import SAMPLING_EXTRAS


class Unsupported(Exception):
    """This engine cannot take the request: `param` and a reason a client can act on."""

    def __init__(self, param: str, why: str) -> None:
        super().__init__(why)
        self.param = param
        self.why = why

    def to_client_error(self, model_id: str) -> GatewayError:
        return GatewayError(400, f"Unsupported parameter '{self.param}' for `{model_id}`: {self.why}.",
                            param=self.param, code="unsupported_parameter")


@dataclass(frozen=True)
class RequestTranslator:
    """The common shape; each engine's instance below states what differs."""

    name: str
    extras: frozenset[str]  # non-spec fields this engine honours
    renames: dict[str, str] = field(default_factory=dict)
    several_choices: bool = True  # n > 1
    best_of: bool = False  # best_of > n
    token_prompts: bool = True
    prompt_batches: bool = True
    suffix: bool = False
    logprobs: bool = True
    response_format: frozenset[str] = frozenset({"/v1/chat/completions", "/v1/completions"})  # endpoints
    output_formats: frozenset[str] = frozenset({"json_object", "json_schema"})
    stream_usage: bool = True  # sends the usage chunk of a stream when asked
    null_max_tokens_is_unlimited: bool = True  # completions' `max_tokens: null` runs to the context's end

    def translate(self, call: UpstreamCall, context_length: int | None = None) -> dict[str, Any]:
        payload = call.payload
        if not payload.keys().isdisjoint(_CHECKED):  # the common request has none of these: one set test
            self._refuse_what_this_engine_cannot_do(call)
        if payload.get("max_tokens") == 0:  # llama.cpp reads 0 as "no limit"; vLLM refuses it
            raise Unsupported("max_tokens", "engines here generate at least one token; send 1 or more")
        renames = self.renames
        if "best_of" in payload or (renames and not payload.keys().isdisjoint(renames)):
            body = {renames.get(name, name): value for name, value in payload.items() if name != "best_of"}
            if payload.get("best_of", 1) > payload.get("n", 1):
                body["best_of"] = payload["best_of"]
        else:
            body = dict(payload)
        if call.path == COMPLETIONS_PATH and "prompt" in payload:
            body["prompt"] = self.prompt(payload["prompt"])
            if not self.null_max_tokens_is_unlimited and context_length and "max_tokens" in payload \
                    and payload["max_tokens"] is None:
                body["max_tokens"] = _room(context_length, payload["prompt"])
        if call.stream and self.stream_usage:  # always: rate limits reconcile with the engine's count
            body["stream_options"] = {"include_usage": True}
        return body

    def _refuse_what_this_engine_cannot_do(self, call: UpstreamCall) -> None:
        payload = call.payload
        for name in payload.keys() & _ALL_EXTRAS:
            if name not in self.extras:
                raise Unsupported(name, f"the {self.name} engine serving it does not take `{name}`")
        if not self.several_choices and payload.get("n", 1) > 1:
            raise Unsupported("n", f"the {self.name} engine serving it generates one choice per request")
        if payload.get("best_of", 1) > payload.get("n", 1) and not self.best_of:
            raise Unsupported("best_of", f"the {self.name} engine serving it cannot rank best_of > n choices")
        if payload.get("suffix") and not self.suffix:
            raise Unsupported("suffix", f"the {self.name} engine serving it does not insert text")
        if not self.logprobs and (payload.get("logprobs") or payload.get("top_logprobs")):
            raise Unsupported("logprobs", f"the {self.name} engine serving it does not return logprobs")
        kind = payload["response_format"].get("type") if "response_format" in payload else None
        if kind is not None and (call.path not in self.response_format or kind not in self.output_formats):
            raise Unsupported("response_format", f"the {self.name} engine serving it cannot constrain "
                              f"the output of this endpoint to {kind}")

    def prompt(self, prompt: Any) -> Any:
        if prompt == "" or prompt == [""]:  # vLLM refuses it; llama.cpp fails an assertion (a 500)
            raise Unsupported("prompt", f"the {self.name} engine serving it cannot complete an empty prompt")
        if isinstance(prompt, str):
            return prompt
        if not self.token_prompts and isinstance(prompt[0], (int, list)):
            raise Unsupported("prompt", f"the {self.name} engine serving it takes text prompts, not token ids")
        if not self.prompt_batches and (isinstance(prompt[0], list) or len(prompt) > 1):
            raise Unsupported("prompt", f"the {self.name} engine serving it takes one prompt per request")
        if not self.prompt_batches and isinstance(prompt[0], str):
            return prompt[0]  # a list of one text
        return prompt


_VLLM_EXTRAS = SAMPLING_EXTRAS | {
    "priority", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
    "structured_outputs", "chat_template", "chat_template_kwargs", "prompt_logprobs", "vllm_xargs",
    "kv_transfer_params",
}
_ALL_EXTRAS = _VLLM_EXTRAS | {"grammar"}
# The fields some engine cannot take (or takes only in some shapes): a request without any of them needs
# no per-engine check.
_CHECKED = frozenset(_ALL_EXTRAS | {"n", "best_of", "suffix", "logprobs", "top_logprobs", "response_format"})

VLLM = RequestTranslator("vLLM", extras=frozenset(_VLLM_EXTRAS), null_max_tokens_is_unlimited=False)
LLAMA_CPP = RequestTranslator(
    "llama.cpp", extras=frozenset({"top_k", "min_p", "repetition_penalty", "grammar"}),
    renames={"repetition_penalty": "repeat_penalty"}, several_choices=False, token_prompts=False,
    prompt_batches=False, suffix=True, response_format=frozenset({"/v1/chat/completions"}),
    output_formats=frozenset({"json_object"}), stream_usage=False,
)
SEQ2SEQ = RequestTranslator(
    "seq2seq", extras=frozenset({"top_k", "min_tokens", "ignore_eos", "repetition_penalty", "stop_token_ids"}),
    logprobs=False, response_format=frozenset(),
)

TRANSLATORS: dict[Engine, RequestTranslator] = {Engine.VLLM: VLLM, Engine.LLAMA_CPP: LLAMA_CPP,
                                                 Engine.SEQ2SEQ: SEQ2SEQ}


def _room(context_length: int, prompt: Any) -> int:
    """Tokens left after a text prompt, at least (BPE and byte-fallback tokenizers make at most one token
    per byte, plus BOS); 16 (the engines' own default) when the bound leaves less."""
    size = len(prompt.encode()) if isinstance(prompt, str) else context_length
    return max(16, context_length - size - 8)


class EnginePayloads:
    """One request's body per engine, translated once and shared by every backend of that engine."""

    __slots__ = ("call", "model_id", "context_length", "_bodies")

    def __init__(self, call: UpstreamCall, model_id: str, context_length: int | None = None) -> None:
        self.call = call
        self.model_id = model_id
        self.context_length = context_length
        self._bodies: dict[Engine, dict[str, Any] | Unsupported] = {}

    def body_for(self, engine: Engine) -> dict[str, Any] | Unsupported:
        body = self._bodies.get(engine)
        if body is None:
            try:
                body = TRANSLATORS[engine].translate(self.call, self.context_length)
            except Unsupported as exc:
                body = exc
            self._bodies[engine] = body
        return body

    def require_some(self, engines: Iterable[Engine]) -> None:
        """The client's 400 when none of these engines can take the request (before it is admitted)."""
        refusal = None
        for engine in engines:
            body = self.body_for(engine)
            if not isinstance(body, Unsupported):
                return
            refusal = refusal or body
        if refusal is not None:
            raise refusal.to_client_error(self.model_id)
