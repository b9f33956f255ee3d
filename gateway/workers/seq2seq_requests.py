"""OpenAI request bodies -> what the engine runs (`Job`), or OpenAI's 400/404 envelope naming the param.

The gateway's wire schema (`gateway.wire.protocol`) validates the OpenAI fields and the vLLM sampling
extensions; this worker honours `top_k`, `ignore_eos`, `min_tokens`, `repetition_penalty` and
`stop_token_ids` and refuses the other extensions with a 400 naming them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from gateway.errors import GatewayError, model_not_found
from gateway.prompts.formats import FORMATS
from gateway.prompts.messages import to_turns
from gateway.wire.protocol import ChatCompletionRequest, CompletionRequest
from gateway.wire.validation import parse_request
from gateway.workers.seq2seq_engine import SamplingParams

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 256  # chat without a limit: the remaining budget, but not an essay
MAX_ROWS = 128  # prompts x n decoded in one batch


HONOURED_EXTRAS = frozenset({"top_k", "min_tokens", "ignore_eos", "repetition_penalty", "stop_token_ids"})


class Tokenizer(Protocol):
    vocab_size: int
    max_model_len: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class Job:
    chat: bool
    prompts: list[list[int]]  # encoder input ids, one list per prompt
    prompt_texts: list[str]  # for `echo`
    n: int
    params: SamplingParams
    stream: bool
    include_usage: bool
    echo: bool


def parse_completion(raw: bytes, served: str, tok: Tokenizer, max_new_tokens: int) -> Job:
    req = parse_request(raw, CompletionRequest)
    _check_model(req.model, served)
    if req.suffix:
        raise _unsupported("suffix", "suffix is not supported by this model.")
    if req.best_of is not None and req.best_of > (req.n or 1):
        raise _unsupported("best_of", "best_of greater than n is not supported by this model.")
    if req.logprobs is not None:
        raise _unsupported("logprobs", "logprobs are not supported by this model's server.")
    prompts, texts = _completion_prompts(req.prompt, tok)
    # OpenAI: an absent max_tokens means 16; an explicit null means "no limit" (the gateway sends
    # that when it turns a chat into a completion), i.e. the chat default.
    default = COMPLETION_DEFAULT_MAX_TOKENS if "max_tokens" not in req.model_fields_set else None
    return _job(req, False, prompts, texts, tok, max_new_tokens, req.max_tokens or default,
                echo=bool(req.echo), param="prompt")


def parse_chat(raw: bytes, served: str, tok: Tokenizer, max_new_tokens: int, prompt_format: str) -> Job:
    req = parse_request(raw, ChatCompletionRequest)
    _check_model(req.model, served)
    if req.logprobs or req.top_logprobs:
        raise _unsupported("logprobs", "logprobs are not supported by this model's server.")
    if req.tools and req.tool_choice != "none":
        raise _unsupported("tools", "This model's prompt format cannot express tools.")
    kind = (req.response_format or {}).get("type", "text")
    if kind != "text":
        raise _unsupported("response_format", f"response_format '{kind}' is not supported by this model.")
    text = FORMATS[prompt_format].render(to_turns(req.messages))
    return _job(req, True, [tok.encode(text)], [text], tok, max_new_tokens,
                req.max_completion_tokens or req.max_tokens, echo=False, param="messages")


def _job(req: CompletionRequest | ChatCompletionRequest, chat: bool, prompts: list[list[int]],
         texts: list[str], tok: Tokenizer, max_new_tokens: int, max_tokens: int | None, *, echo: bool,
         param: str) -> Job:
    refused = sorted(req.extras - HONOURED_EXTRAS)
    if refused:
        raise _unsupported(refused[0], f"'{refused[0]}' is not supported by this model's server.")
    longest = max(len(p) for p in prompts)
    if longest > tok.max_model_len:
        where = "in the messages" if chat else "in your prompt"
        raise GatewayError(
            400,
            f"This model's maximum context length is {tok.max_model_len} tokens. However, you requested "
            f"{longest} tokens {where}. Please reduce the length of the {'messages' if chat else 'prompt'}.",
            param=param, code="context_length_exceeded")
    if req.stream_options is not None and not req.stream:
        raise GatewayError(400, "Invalid 'stream_options': only allowed when 'stream' is true.",
                           param="stream_options", code="invalid_value")
    n = req.n or 1
    if n * len(prompts) > MAX_ROWS:
        raise GatewayError(400, f"Invalid 'n': at most {MAX_ROWS} choices (prompts x n) per request.",
                           param="n", code="invalid_value")
    if max_tokens is None:
        # T5's decoder budget is its own, but the gateway accounts prompt + completion against the
        # model's context length, so the default stays within what is left of it.
        max_tokens = min(CHAT_DEFAULT_MAX_TOKENS, max_new_tokens, max(1, tok.max_model_len - longest))
    if max_tokens > max_new_tokens:
        name = "max_completion_tokens" if "max_completion_tokens" in req.model_fields_set else "max_tokens"
        raise GatewayError(400, f"Invalid '{name}': this server generates at most {max_new_tokens} tokens, "
                           f"but {max_tokens} were requested.", param=name, code="invalid_value")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    bias = _logit_bias(req.logit_bias, tok.vocab_size)
    for token in req.stop_token_ids or []:
        if not 0 <= token < tok.vocab_size:
            raise GatewayError(400, f"Invalid 'stop_token_ids': token id {token} is out of range.",
                               param="stop_token_ids", code="invalid_value")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        seed=req.seed,
        stop=tuple(stop),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=bool(req.ignore_eos),
        min_tokens=min(req.min_tokens or 0, max_tokens),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        logit_bias=bias,
    )
    include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
    return Job(chat, prompts, texts, n, params, bool(req.stream), include_usage, echo)


def _completion_prompts(prompt: Any, tok: Tokenizer) -> tuple[list[list[int]], list[str]]:
    """OpenAI's four prompt shapes: text, texts, token ids, lists of token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    if not prompt:
        raise GatewayError(400, "Invalid 'prompt': the prompt must not be empty.", param="prompt",
                           code="invalid_value")
    ids: list[list[int]] = []
    texts: list[str] = []
    for item in prompt:
        if isinstance(item, str):
            ids.append(tok.encode(item))
            texts.append(item)
        else:
            if not item or any(not 0 <= t < tok.vocab_size for t in item):
                raise GatewayError(400, "Invalid 'prompt': token ids must be a non-empty list of ids "
                                   f"below {tok.vocab_size}.", param="prompt", code="invalid_value")
            ids.append(list(item))
            texts.append(tok.decode(list(item)))
    return ids, texts


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    result = {}
    for key, value in (bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
            raise GatewayError(400, f"Invalid 'logit_bias': '{key}' is not a token id of this model.",
                               param="logit_bias", code="invalid_value")
        if not -100 <= value <= 100:
            raise GatewayError(400, f"Invalid 'logit_bias': bias {value} for token {key} is outside "
                               "[-100, 100].", param="logit_bias", code="invalid_value")
        result[int(key)] = float(value)
    return result


def _check_model(requested: str, served: str) -> None:
    if requested != served:
        raise model_not_found(requested)


def _unsupported(param: str, message: str) -> GatewayError:
    return GatewayError(400, message, param=param, code="unsupported_parameter")
