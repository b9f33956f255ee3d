"""Parse and validate a request body into its typed model, or raise OpenAI's 400 naming the `param`."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from gateway.errors import GatewayError
from gateway.wire.protocol import MAX_ITEMS

Request = TypeVar("Request", bound=BaseModel)

_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "a boolean", "string": "a string",
               "list": "an array", "dict": "an object", "model": "an object"}


def parse_request(raw: bytes, schema: type[Request]) -> Request:
    try:
        body = orjson.loads(raw)  # orjson refuses nesting deeper than 1,024 levels: a 400 too
    except orjson.JSONDecodeError:
        raise GatewayError(
            400,
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload.",
        ) from None
    if not isinstance(body, dict):
        raise GatewayError(400, "The request body must be a JSON object.")
    _refuse_long_lists(body)
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        raise _to_openai_error(exc) from None


def _refuse_long_lists(body: dict[str, Any]) -> None:
    """MAX_ITEMS, counted before any item is validated (a plain function, not a pydantic model validator:
    that wrapper cost more than the check)."""
    for name, value in body.items():
        if type(value) is list or type(value) is dict:
            cap = MAX_ITEMS.get(name)
            if cap is not None and len(value) > cap:
                raise GatewayError(400, f"Invalid '{name}': at most {cap} items, got {len(value)}.",
                                   param=name, code="invalid_value")
    prompt = body.get("prompt")
    if type(prompt) is list and prompt and type(prompt[0]) is list:
        total = sum(len(p) for p in prompt if type(p) is list)
        if total > MAX_ITEMS["prompt"]:
            raise GatewayError(400, f"Invalid 'prompt': at most {MAX_ITEMS['prompt']} token ids in all, "
                               f"got {total}.", param="prompt", code="invalid_value")


def _to_openai_error(exc: ValidationError) -> GatewayError:
    error = min(exc.errors(), key=_specificity)
    loc = [part for part in error["loc"] if not _is_union_branch(part)]
    param = _param_path(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        return GatewayError(400, f"Unrecognized request argument supplied: {param}", param=param,
                            code="unknown_parameter")
    if kind == "json_depth":
        return GatewayError(400, f"Invalid '{param}': {error['msg']}.", param=param, code="invalid_value")
    if kind == "missing":
        return GatewayError(400, f"Missing required parameter: '{param}'.", param=param,
                            code="missing_required_parameter")
    if kind in {"greater_than_equal", "less_than_equal", "greater_than", "less_than"}:
        return GatewayError(400, f"Invalid '{param}': {error['msg']}, but got {error['input']!r}.",
                            param=param, code="invalid_value")
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "model_attributes_type":
        expected = _TYPE_WORDS.get(kind.split("_")[0], kind.split("_")[0])
        return GatewayError(400, f"Invalid type for '{param}': expected {expected}.", param=param,
                            code="invalid_type")
    if kind == "too_short" and param == "messages":
        return GatewayError(400, "Invalid 'messages': empty array. Expected an array with minimum "
                            "length 1, but got an empty array instead.", param=param,
                            code="empty_array")
    return GatewayError(400, f"Invalid '{param}': {error['msg']}.", param=param, code="invalid_value")


def _specificity(error: Any) -> int:
    """For a union (`stop: str | list[str]`), the branch whose type matched says what is really wrong."""
    kind = error["type"]
    return 1 if kind.endswith("_type") or kind.endswith("_parsing") else 0


def _is_union_branch(part: Any) -> bool:
    # pydantic names the union member it tried ("str", "list[str]", "function-after[...]") in `loc`.
    # Field names are identifiers; branch tags are type names or contain "[" / "-" ("constrained-str").
    return isinstance(part, str) and ("[" in part or "-" in part or part in {"str", "int", "float", "bool", "list"})


def _param_path(loc: list[Any]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"
