"""The one error type every layer raises for a client-visible failure (bottom of the stack).

It carries OpenAI's error fields; `gateway.api.errors` turns it into the `{"error": {...}}` envelope.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class ConfigError(Exception):
    """A configuration file is invalid; `problems` holds one line per problem, each naming the file,
    the entry and the field."""

    what = "configuration"

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"invalid {self.what}:\n" + "\n".join(f"  - {p}" for p in problems))


def field_path(loc: tuple) -> str:
    """A pydantic error location as the dotted field name config messages use ("backends.0.url")."""
    return ".".join(str(part) for part in loc) or "(entry)"


class GatewayError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class ClientGone(Exception):
    """The client closed its connection before its answer started: the work is stopped, nobody is answered."""


def model_not_found(model_id: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model `{model_id}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def model_not_deployed(model_id: str) -> GatewayError:
    """A registry model this deployment does not run: not an outage (503), and retrying will not help."""
    return GatewayError(
        404,
        f"The model `{model_id}` is not deployed here: this gateway serves only the models its deployment "
        "runs (GET /v1/models lists them).",
        param="model",
        code="model_not_found",
    )


def license_forbidden(reason: str) -> GatewayError:
    """The license rules refuse this tenant the model (which it may know exists); `reason` says why and
    what would permit it."""
    return GatewayError(403, reason, type="permission_error", param="model", code="model_license_forbidden")


@dataclass(frozen=True)
class BackendFailure:
    """Why one backend of a model could not answer: named in the 503, with its URL."""

    backend_id: str
    url: str
    reason: str
    lasting: bool = False  # looks permanent (a name that does not resolve, refused for long): no retry helps

    def __str__(self) -> str:
        return f"`{self.backend_id}` at {self.url}: {self.reason}"


def no_backend_available(model_id: str, failures: Sequence[BackendFailure] | str, retry_after_s: int) -> GatewayError:
    """503. Transient failures carry Retry-After; failures that look permanent say so and carry OpenAI's
    `x-should-retry: false`, so that the SDKs do not spend their retries (and the caller's time) on them."""
    if isinstance(failures, str):
        detail, lasting = failures, False
    else:
        detail = "; ".join(map(str, failures)) or "the registry configures no backend for it"
        lasting = all(failure.lasting for failure in failures)
    if lasting:
        return GatewayError(
            503,
            f"No backend can serve model `{model_id}` ({detail}). This does not look like a passing failure: "
            "the model is not deployed where this gateway can reach it, or its backend URL in the registry is "
            "wrong. Retrying will not help until an operator fixes that (GET /admin/backends shows every "
            "backend's state).",
            type="service_unavailable_error",
            code="backend_unreachable",
            headers={"x-should-retry": "false"},
        )
    return GatewayError(
        503,
        f"No backend for model `{model_id}` is reachable right now ({detail}). Retry later.",
        type="service_unavailable_error",
        code="backend_unavailable",
        headers={"Retry-After": str(retry_after_s)},
    )
