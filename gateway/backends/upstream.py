"""`OpenAIUpstream`: one backend that speaks OpenAI's HTTP API (vLLM, llama.cpp's server, our workers).

One pooled aiohttp `ClientSession` (keep-alive connections) is shared by every backend. aiohttp, not
httpx, on this hop: measured here against the same mock, httpx/httpcore spent ~1,360 µs of CPU per
request at 16 connections (its pool scans every connection per request) and aiohttp ~110 µs; this hop
is most of the gateway's own cost. Requests go out as the client's own JSON (already edited by the
pipeline); answers come back as raw bytes or a byte stream, never parsed into models here.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import Enum

import aiohttp
import orjson

from gateway import deadlines
from gateway.backends.engines import EngineProfile, profile_of
from gateway.backends.timeouts import CallTimeouts
from gateway.errors import GatewayError
from gateway.registry.schema import Backend
from gateway.settings import Settings

_JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=2.0)
# llama.cpp tokenizes only once its model lock is free, i.e. after the generation in progress.
_TOKENIZE_TIMEOUT = aiohttp.ClientTimeout(total=30.0)


class Unreachable(str, Enum):
    """Why nothing reached an engine, as far as the gateway can tell."""

    UNRESOLVABLE = "unresolvable"  # DNS says the host name does not exist: a wrong or undeployed backend
    LOOKUP_FAILED = "lookup_failed"  # the DNS server did not answer (or failed): says nothing about the name
    REFUSED = "refused"  # nothing listens there (yet): an engine down, starting, or a wrong port
    OTHER = "other"  # a timeout, a reset, an HTTP 5xx: transient


class UpstreamUnavailable(Exception):
    """Nothing reached the engine or nothing came back before headers: safe to try another backend."""

    def __init__(self, backend_id: str, reason: str, *, timed_out: bool = False, url: str = "",
                 kind: Unreachable = Unreachable.OTHER) -> None:
        super().__init__(f"`{backend_id}` at {url}: {reason}" if url else f"{backend_id}: {reason}")
        self.backend_id = backend_id
        self.reason = reason
        self.timed_out = timed_out
        self.url = url
        self.kind = kind


@dataclass(frozen=True)
class ProbeVerdict:
    """What the health probes know of a failing backend: their last failure, and for how long they have
    failed without a pass."""

    failure: UpstreamUnavailable
    failing_for_s: float


def looks_lasting(kind: Unreachable, probes: ProbeVerdict | None, lasting_after_s: float) -> bool:
    """A host name that does not resolve (a DNS server failing to answer for a name that did not resolve
    at the last probe counts too), or nothing listening for `lasting_after_s` of probes: an operator's
    problem (not deployed here, a wrong URL or port), not a blip worth retrying."""
    probed = probes.failure.kind if probes is not None else None
    if kind is Unreachable.UNRESOLVABLE:
        return True
    if kind is Unreachable.LOOKUP_FAILED:
        return probed is Unreachable.UNRESOLVABLE
    return kind is Unreachable.REFUSED and probes is not None and probes.failing_for_s >= lasting_after_s


def for_how_long(seconds: float) -> str:
    return f"for {seconds / 60:.0f} min" if seconds >= 90 else f"for {seconds:.0f} s"


def connect_failure(exc: aiohttp.ClientError) -> tuple[str, Unreachable]:
    """A failed connection in words, and what kind of failure it is."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        # c-ares says "Domain name not found", the system resolver EAI_NONAME: the name does not exist.
        # Anything else (a DNS server that timed out or failed) may pass.
        os_error = exc.os_error
        if os_error.errno == socket.EAI_NONAME or "not found" in str(os_error.strerror or "").lower():
            return "its host name does not resolve", Unreachable.UNRESOLVABLE
        return f"the DNS lookup of {exc.host} failed ({os_error.strerror or os_error})", Unreachable.LOOKUP_FAILED
    if isinstance(exc, aiohttp.ClientConnectorError):
        if exc.os_error.errno == errno.ECONNREFUSED:
            return "connection refused: nothing listens there", Unreachable.REFUSED
        return f"cannot connect ({exc.os_error.strerror or type(exc.os_error).__name__})", Unreachable.OTHER
    return type(exc).__name__, Unreachable.OTHER


class GenerationTimedOut(Exception):
    """A non-streamed answer was not complete within the generation timeout: the engine was working on
    it (a long answer is ordinary traffic), so this is neither retried nor counted against the engine."""


class UpstreamStalled(Exception):
    """The engine sent nothing for longer than the idle timeout in the middle of its answer."""


class UpstreamBroken(Exception):
    """The engine's connection broke (or its framing was invalid) in the middle of its answer."""


def make_http_client(settings: Settings) -> aiohttp.ClientSession:
    # Per-request timeouts are set by the dispatcher from the backend's role and the model's overrides.
    # c-ares (aiodns) resolves without threads. The thread resolver would share libuv's 4 worker threads
    # with uvloop's sock_connect, which calls getaddrinfo even for numeric IPs: a few slow lookups of
    # unresolvable backend names (probes) then stalled every new connection to 127.0.0.1 (seen in tests).
    connector = aiohttp.TCPConnector(
        limit=settings.pool_size, limit_per_host=0, keepalive_timeout=30.0, ttl_dns_cache=10,
        resolver=aiohttp.AsyncResolver(),
    )
    # trust_env=False: a proxy variable on a node must never divert traffic meant for the engines.
    # No compression negotiation: engines answer plain, and the bytes are forwarded as they are.
    return aiohttp.ClientSession(connector=connector, trust_env=False, auto_decompress=False,
                                 skip_auto_headers=("User-Agent", "Accept-Encoding"),
                                 timeout=aiohttp.ClientTimeout(total=None))


class UpstreamResponse:
    """An engine's answer: status, and either the whole body or a stream of raw byte chunks."""

    __slots__ = ("status", "body", "_response", "_idle_s")

    def __init__(self, response: aiohttp.ClientResponse, body: bytes | None, idle_s: float) -> None:
        self.status = response.status
        self.body = body
        self._response = response
        self._idle_s = idle_s

    async def read(self) -> bytes:
        if self.body is None:
            try:
                with deadlines.timeout(self._idle_s):
                    self.body = await self._response.read()
            except (TimeoutError, aiohttp.ClientError):
                self.body = b""
            finally:
                self.close()
        return self.body

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises UpstreamStalled / UpstreamBroken on a failure mid-way."""
        content = self._response.content
        while True:
            try:
                with deadlines.timeout(self._idle_s):
                    data = await content.readany()
            except TimeoutError as exc:
                raise UpstreamStalled() from exc
            except aiohttp.ClientError as exc:
                raise UpstreamBroken(type(exc).__name__) from exc
            if not data:
                if not content.is_eof():
                    raise UpstreamBroken("no data")
                return
            yield data

    async def finish(self, wait_s: float = 1.0) -> None:
        """Read what is left of a body whose last event came (the chunked terminator), so the
        connection goes back to the pool instead of being dropped; give up after `wait_s`."""
        content = self._response.content
        try:
            with deadlines.timeout(wait_s):
                while await content.readany():
                    pass
        except (TimeoutError, aiohttp.ClientError):
            pass
        self.close()

    def close(self) -> None:
        """Drop the connection unless the body was read to its end (then it goes back to the pool).

        Dropping it is what tells an engine the client went away: vLLM aborts the generation.
        """
        self._response.release() if self._response.content.is_eof() else self._response.close()


class OpenAIUpstream:
    """One engine: a backend's URL, or one pod of a `discovery: dns` backend (then `id` is
    `<backend id>@<address>`, and `name` the backend id clients and usage records see)."""

    def __init__(self, backend: Backend, model_id: str, client: aiohttp.ClientSession,
                 timeouts: CallTimeouts, *, name: str | None = None, address: str = "",
                 api_key: str | None = None) -> None:
        self.backend = backend
        self.name = name or backend.id
        self.address = address
        self.timeouts = timeouts  # by role, with the model's overrides
        # aiohttp bounds only the socket connect (its `connect` would also count the wait for a pooled
        # connection: backpressure, not an engine fault); reading is bounded here.
        self._connect_timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=timeouts.connect_s)
        self.profile: EngineProfile = profile_of(backend.engine)
        self.model_id = model_id  # the registry's id, the name clients use
        self.served_model_name = backend.served_model_name or model_id  # the engine's name for it
        self._client = client
        self._base_url = backend.base_url
        # Engines started with an API key (--api-key) refuse anyone else: no license check is bypassed.
        self._headers = {**_JSON_HEADERS, "Authorization": f"Bearer {api_key}"} if api_key else _JSON_HEADERS
        self._probe_headers = {"Authorization": f"Bearer {api_key}"} if api_key else None

    @property
    def id(self) -> str:
        return self.backend.id

    async def post(self, path: str, body: bytes, *, stream: bool) -> UpstreamResponse:
        """POST the JSON `body`; with `stream` the answer is left unread for the caller to relay.

        Raises `UpstreamUnavailable` when the engine could not be reached or (streams) sent no headers
        within the first-byte timeout: safe to retry elsewhere. A non-streamed answer gets the whole
        generation timeout (engines send headers when it is done) and `GenerationTimedOut` after it.
        Cancelling the call (the client went away) closes the connection: vLLM aborts the generation.
        """
        timeouts = self.timeouts
        response: aiohttp.ClientResponse | None = None
        try:
            with deadlines.timeout(timeouts.first_byte_s if stream else timeouts.generation_s):
                response = await self._client.post(self._base_url + path, data=body, headers=self._headers,
                                                   timeout=self._connect_timeout)
                if stream:
                    return UpstreamResponse(response, None, timeouts.idle_s)
                data = await response.read()
        except aiohttp.ClientError as exc:  # before TimeoutError: aiohttp's connect timeout is both
            if response is None:
                reason, kind = connect_failure(exc)
                raise UpstreamUnavailable(self.id, reason, url=self._base_url, kind=kind) from exc
            response.close()
            raise GatewayError(502, f"The model backend broke off its answer ({type(exc).__name__}).",
                               type="upstream_error", code="upstream_disconnected") from exc
        except TimeoutError as exc:
            if response is not None:
                response.close()
            if stream:
                raise UpstreamUnavailable(self.id, "no response headers in time", timed_out=True,
                                          url=self._base_url) from exc
            raise GenerationTimedOut() from exc
        except BaseException:
            if response is not None:
                response.close()  # cancelled: drop the connection so the engine stops generating
            raise
        return UpstreamResponse(response, data, timeouts.idle_s)

    async def count_tokens(self, text: str) -> int | None:
        """Token count of `text` with the engine's own tokenizer, or None if it cannot tell us."""
        path = self.profile.tokenize_path
        if path is None:
            return None
        payload = {"model": self.served_model_name, self.profile.tokenize_field: text}
        try:
            async with self._client.post(self._base_url + path, data=orjson.dumps(payload),
                                         headers=self._headers, timeout=_TOKENIZE_TIMEOUT) as response:
                if response.status != 200:
                    return None
                data = orjson.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
            return None
        count = data.get("count") if isinstance(data, dict) else None
        return count if isinstance(count, int) else None

    async def probe(self) -> UpstreamUnavailable | None:
        """GET the engine's health path: None when it answers 200, else what went wrong."""
        try:
            async with self._client.get(self._base_url + self.profile.health_path, headers=self._probe_headers,
                                        timeout=_PROBE_TIMEOUT) as response:
                await response.read()
                if response.status == 200:
                    return None
                reason, kind = f"health probe answered HTTP {response.status}", Unreachable.OTHER
        except aiohttp.ClientError as exc:
            reason, kind = connect_failure(exc)
        except TimeoutError:
            return UpstreamUnavailable(self.id, f"no answer to the health probe within {_PROBE_TIMEOUT.total:g} s",
                                       url=self._base_url, timed_out=True)
        return UpstreamUnavailable(self.id, reason, url=self._base_url, kind=kind)
