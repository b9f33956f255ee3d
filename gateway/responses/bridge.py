"""`POST /v1/responses`: a Responses request served by the chat pipeline, its chat answer made a Response.

    parse, refuse what no model here can do -> the stored chain (`previous_response_id`) -> the chat request
    -> gateway.pipeline.serve (policy, prompt format, context check, limits, routing, backend, usage and
       audit, exactly as for any chat: the caller was identified before the body was read)
    -> the answer translated back (JSON, or the event stream), stored before its last byte leaves

The engines never see `store`, `previous_response_id` or the response ids: the gateway owns that state
(vLLM keeps its own store in one process, off by default; llama.cpp has no /v1/responses at all).
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import orjson
from starlette.responses import Response, StreamingResponse

from gateway import pipeline
from gateway.backends.dispatch import ClientWatch
from gateway.errors import GatewayError
from gateway.observability.record import RequestRecord
from gateway.observability.request_context import RequestContext
from gateway.prompts.prepare import prepare_chat
from gateway.responses.chain import load_history
from gateway.responses.errors import as_responses_error
from gateway.responses.objects import skeleton
from gateway.responses.prepare import prepare_turn
from gateway.responses.request import Turn, new_id, refuse_unsupported, to_turn
from gateway.responses.store import StoredResponse
from gateway.responses.translate import ResponseTranslator, Save
from gateway.tenancy.tenants import Caller
from gateway.wire.protocol import ChatCompletionRequest
from gateway.admission.holds import Hold
from gateway.wire.responses import ResponsesRequest
from gateway.wire.validation import parse_request

# The route's entry (gateway.api.generation); each request is served by one bound to its turn.
RESPONSES = pipeline.Endpoint("responses", ChatCompletionRequest, prepare_chat)


async def create_response(state: pipeline.GatewayState, caller: Caller, raw: bytes, context: RequestContext,
                          client_gone: ClientWatch | None = None, held: Hold | None = None) -> Response:
    arrived, created_at = time.monotonic(), int(time.time())
    try:
        request = parse_request(raw, ResponsesRequest)
        refuse_unsupported(request)
        history = [] if request.previous_response_id is None else await load_history(
            state.responses, caller.tenant.name, request.previous_response_id, state.settings.responses_max_chain,
            request.truncation == "auto")
        turn = to_turn(request, history)
    except GatewayError as exc:  # refused before the pipeline: counted as the pipeline counts its refusals
        _count_refusal(state, caller, exc.status, arrived)
        raise
    store = request.store is not False
    save = _saver(state, caller, request, turn) if store else None
    translator = ResponseTranslator(skeleton(request, new_id("resp_"), created_at, store), new_id("msg_"), save)
    try:
        endpoint = pipeline.Endpoint(RESPONSES.name, ChatCompletionRequest, partial(prepare_turn, turn, translator))
        answer = await pipeline.serve(state, endpoint, caller, b"", context, client_gone, held, request=turn.chat)
    except GatewayError as exc:
        raise as_responses_error(exc, turn) from None
    if isinstance(answer, StreamingResponse):  # the relay translated its events (prepare_turn)
        answer.body_iterator = translator.stream(answer.body_iterator)
        return answer
    final = translator.final(answer.body)
    encoded = orjson.dumps(final)  # once: the client's body and the stored one
    if save is not None:
        try:
            await save(final, encoded)
        except Exception:
            # Acknowledged means stored: a 200 here would promise a chain that cannot continue. The
            # answer's bookkeeping (usage, metrics, in-flight count) still runs when this body is sent.
            error = GatewayError(503, "The response could not be stored (the response store is unavailable); "
                                 "retry, or send store: false.", type="service_unavailable_error",
                                 code="store_unavailable")
            _replace_body(answer, orjson.dumps(error.body()), 503)
            return answer
    _replace_body(answer, encoded)
    return answer


def _saver(state: pipeline.GatewayState, caller: Caller, request: ResponsesRequest, turn: Turn) -> Save:
    store, retention = state.responses, state.settings.responses_retention_s
    expected = store.expect()  # dropped with this closure if the request ends before its answer is saved

    async def save(final: dict[str, Any], encoded: bytes) -> None:
        created = final["created_at"]
        await store.save(StoredResponse(final["id"], caller.tenant.name, created, request.previous_response_id,
                                        final, turn.input_items, encoded), created + retention, expected)

    return save


def _replace_body(answer: Response, body: bytes, status: int | None = None) -> None:
    """The pipeline's JSON answer with the Response as its body: the same object, so that its outcome is
    still reported once it is sent (gateway.backends.dispatch.AnswerThenReport)."""
    answer.body = body
    raw = answer.raw_headers
    for index, (name, _) in enumerate(raw):
        if name == b"content-length":
            raw[index] = (name, str(len(body)).encode())
            break
    if status is not None:
        answer.status_code = status


def _count_refusal(state: pipeline.GatewayState, caller: Caller, status: int, arrived: float) -> None:
    record = RequestRecord(state.metrics, state.settings.metrics_tenant_label, arrived, endpoint=RESPONSES.name)
    record.tenant = caller.tenant.name
    record.finished(status)
