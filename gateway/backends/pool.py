"""Every backend of every registry model, as `OpenAIUpstream`s sharing one HTTP connection pool."""

from __future__ import annotations

import aiohttp

from gateway.backends.upstream import OpenAIUpstream
from gateway.backends.timeouts import timeouts_for
from gateway.registry import Registry
from gateway.settings import Settings


def build_upstreams(registry: Registry, client: aiohttp.ClientSession,
                    settings: Settings) -> dict[str, OpenAIUpstream]:
    """Backend id -> its upstream (backend ids are unique across the registry), timeouts resolved once."""
    return {
        backend.id: OpenAIUpstream(backend, model.id, client, timeouts_for(settings, backend, model.timeouts))
        for model in registry.models.values()
        for backend in model.backends
    }
