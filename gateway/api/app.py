"""The FastAPI application: load the registry at start-up, share one upstream pool, mount routes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway.api.errors import install_error_handlers
from gateway.api.routes import router
from gateway.backends.pool import build_upstreams
from gateway.backends.upstream import make_http_client
from gateway.pipeline import GatewayState
from gateway.registry import load_registry
from gateway.settings import Settings, get_settings
from gateway.tenancy.auth import warn_open_access


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = load_registry(settings.registry_paths)  # RegistryError stops start-up, by design
        warn_open_access()
        async with make_http_client(settings) as client:
            app.state.created = int(time.time())
            app.state.gateway = GatewayState(settings, registry, client, build_upstreams(registry, client))
            yield

    app = FastAPI(title="LLM gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.include_router(router)
    return app
