"""`OpenAIUpstream`: one backend that speaks OpenAI's HTTP API (vLLM, llama.cpp's server, our workers).

One pooled `httpx.AsyncClient` is shared by every backend; requests are sent as the client's own JSON
(already edited by the pipeline) and responses come back as raw bytes or a byte stream, never parsed
into models here.
"""

from __future__ import annotations

import asyncio

import httpx
import orjson

from gateway.backends.engines import EngineProfile, profile_of
from gateway.backends.timeouts import CallTimeouts
from gateway.errors import GatewayError
from gateway.registry.schema import Backend
from gateway.settings import Settings

_JSON_HEADERS = {"content-type": "application/json", "accept": "application/json"}


class UpstreamUnavailable(Exception):
    """Nothing reached the engine or nothing came back before headers: safe to try another backend."""

    def __init__(self, backend_id: str, reason: str, *, timed_out: bool = False) -> None:
        super().__init__(f"{backend_id}: {reason}")
        self.backend_id = backend_id
        self.reason = reason
        self.timed_out = timed_out


def make_http_client(settings: Settings) -> httpx.AsyncClient:
    # Per-request timeouts are set by the dispatcher from the backend's role and the model's overrides.
    timeout = httpx.Timeout(settings.primary_idle_timeout_s, connect=settings.primary_connect_timeout_s)
    limits = httpx.Limits(
        max_connections=settings.pool_max_connections,
        max_keepalive_connections=settings.pool_max_keepalive,
    )
    # trust_env=False: a proxy variable on a node must never divert traffic meant for the engines.
    return httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)


class OpenAIUpstream:
    def __init__(self, backend: Backend, model_id: str, client: httpx.AsyncClient) -> None:
        self.backend = backend
        self.profile: EngineProfile = profile_of(backend.engine)
        self.served_model_name = backend.served_model_name or model_id
        self._client = client
        self._base_url = backend.base_url

    @property
    def id(self) -> str:
        return self.backend.id

    async def post(self, path: str, payload: dict, *, stream: bool, timeouts: CallTimeouts) -> httpx.Response:
        """POST `payload`; with `stream` the body is left unread for the caller to relay.

        Raises `UpstreamUnavailable` when nothing came back before the headers (safe to retry
        elsewhere), with `timed_out` set when the reason was the first-byte timeout.
        """
        request = self._client.build_request(
            "POST", self._base_url + path, content=orjson.dumps(payload), headers=_JSON_HEADERS,
            timeout=httpx.Timeout(timeouts.idle_s, connect=timeouts.connect_s),
        )
        try:
            async with asyncio.timeout(timeouts.first_byte_s):
                response = await self._client.send(request, stream=True)
        except TimeoutError as exc:
            raise UpstreamUnavailable(self.id, "no response headers in time", timed_out=True) from exc
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as exc:
            raise UpstreamUnavailable(self.id, type(exc).__name__) from exc
        except httpx.TimeoutException as exc:
            raise UpstreamUnavailable(self.id, type(exc).__name__, timed_out=True) from exc
        if not stream:
            try:
                async with asyncio.timeout(timeouts.total_s):
                    await response.aread()
            except (TimeoutError, httpx.TimeoutException) as exc:
                await response.aclose()
                raise GatewayError(504, "The model backend did not finish its answer in time.",
                                   type="upstream_error", code="upstream_timeout") from exc
            except httpx.HTTPError as exc:
                raise GatewayError(502, f"The model backend broke off its answer ({type(exc).__name__}).",
                                   type="upstream_error", code="upstream_disconnected") from exc
        return response

    async def count_tokens(self, text: str) -> int | None:
        """Token count of `text` with the engine's own tokenizer, or None if it cannot tell us."""
        path = self.profile.tokenize_path
        if path is None:
            return None
        payload = {"model": self.served_model_name, self.profile.tokenize_field: text}
        try:
            response = await self._client.post(self._base_url + path, content=orjson.dumps(payload),
                                               headers=_JSON_HEADERS)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        data = orjson.loads(response.content)
        count = data.get("count") if isinstance(data, dict) else None
        return count if isinstance(count, int) else None

    async def is_healthy(self) -> bool:
        try:
            response = await self._client.get(self._base_url + self.profile.health_path, timeout=2.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200
