"""Refuse a prompt that cannot fit the model's context before any engine works on it.

Cheap first: a prompt whose UTF-8 size (plus a margin for BOS and word-start pieces) fits is accepted
without tokenizing, since BPE and SentencePiece-with-byte-fallback tokenizers never make more tokens
than bytes. Otherwise the prompt is counted with the engine's own tokenizer (vLLM `/tokenize`,
llama.cpp `/extras/tokenize/count`, our seq2seq worker's `/tokenize`). Where no tokenizer answers, a
documented estimate is used: one token per 3 bytes, which undercounts only unusually dense text, so
the gateway errs towards letting the engine give the final word rather than refusing a prompt that fits.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from gateway.errors import GatewayError
from gateway.prompts.prepare import CHAT_PATH, Reply, UpstreamCall
from gateway.registry.schema import Model

_MARGIN_TOKENS = 8
_BYTES_PER_TOKEN_ESTIMATE = 3

TokenCounter = Callable[[str], Awaitable[int | None]]


async def ensure_prompt_fits(model: Model, call: UpstreamCall, count_tokens: TokenCounter) -> None:
    text = call.prompt_text
    if text is None:
        return  # token-id or batched prompts: the engine checks those itself
    completion = call.max_tokens or 1
    room = model.context_length - completion
    size = len(text.encode("utf-8"))
    if size + _MARGIN_TOKENS <= room:
        return
    tokens = await count_tokens(text)
    if tokens is None:
        tokens = size // _BYTES_PER_TOKEN_ESTIMATE
    if tokens > room:
        raise _too_long(model, call, tokens, completion)


def _too_long(model: Model, call: UpstreamCall, prompt_tokens: int, completion: int) -> GatewayError:
    is_chat = call.path == CHAT_PATH or call.reply is Reply.CHAT_FROM_COMPLETION
    where = "in the messages" if is_chat else "in your prompt"
    return GatewayError(
        400,
        f"This model's maximum context length is {model.context_length} tokens. However, you requested "
        f"{prompt_tokens + completion} tokens ({prompt_tokens} {where}, {completion} in the completion). "
        "Please reduce the length of the messages or completion.",
        param="messages" if is_chat else "prompt",
        code="context_length_exceeded",
    )
