"""Every backend of every registry model, as `OpenAIUpstream`s sharing one HTTP connection pool."""

from __future__ import annotations

import aiohttp

from gateway.backends.upstream import OpenAIUpstream
from gateway.registry import Registry


def build_upstreams(registry: Registry, client: aiohttp.ClientSession) -> dict[str, OpenAIUpstream]:
    """Backend id -> its upstream (backend ids are unique across the registry)."""
    return {
        backend.id: OpenAIUpstream(backend, model.id, client)
        for model in registry.models.values()
        for backend in model.backends
    }
