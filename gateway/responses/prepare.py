"""The pipeline's `prepare` step for a Responses turn: chat's, without a gateway default for max_tokens,
and with `truncation: "auto"` the oldest turns of the stored conversation dropped until it fits.

No default: a Responses client that sets no `max_output_tokens` means "until the model's own end (or the
context's)". Cutting it at a tenant's or model's `default_max_tokens` would end it `incomplete`, which the
Agents SDK treats as a failed run; the reservation is the whole context instead, as for chat without one.
"""

from __future__ import annotations

from gateway.prompts.prepare import UpstreamCall, prepare_chat
from gateway.registry import Model
from gateway.responses.request import Turn
from gateway.responses.translate import ResponseTranslator
from gateway.wire.protocol import ChatCompletionRequest

# As gateway.prompts.context's estimate where no tokenizer is asked: it undercounts only unusually dense
# text, so the engine's own count (the pipeline's context check after this) has the last word.
_BYTES_PER_TOKEN = 3


def prepare_turn(turn: Turn, translator: ResponseTranslator, model: Model, chat: ChatCompletionRequest,
                 _default_max_tokens: int | None = None) -> UpstreamCall:
    """The pipeline's `prepare` for this turn (bound to it: `functools.partial(prepare_turn, turn,
    translator)`). A stream's events become Responses events in the relay (`translator.over`)."""
    call = prepare_chat(model, chat)
    if turn.truncate:
        call = _truncated(turn, model, chat, call)
    call.restyle_stream = translator.over
    return call


def _truncated(turn: Turn, model: Model, chat: ChatCompletionRequest, call: UpstreamCall) -> UpstreamCall:
    """Drop the chain's messages, oldest first, until the prompt's estimate fits the context; the history
    kept starts with a user turn (every 2023 chat format alternates from one). This turn's own input and
    the instructions are never dropped: if they alone do not fit, the context check refuses them."""
    start, end = turn.history
    room = model.context_length - (chat.max_tokens or 1)
    excess = _estimate(call) - room
    drop = start
    messages = chat.messages
    while excess > 0 and drop < end:
        freed = 0
        while drop < end and freed < excess * _BYTES_PER_TOKEN:
            freed += len((messages[drop].content or "").encode()) + 1
            drop += 1
        while drop < end and messages[drop].role != "user":
            drop += 1
        call = prepare_chat(model, chat.model_copy(update={"messages": messages[:start] + messages[drop:]}))
        excess = _estimate(call) - room
    if drop > start:  # errors about later messages must still name the right input item
        turn.origins = turn.origins[:start] + turn.origins[drop:]
    return call


def _estimate(call: UpstreamCall) -> int:
    return len((call.prompt_text or "").encode()) // _BYTES_PER_TOKEN
