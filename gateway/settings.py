"""Process settings, from `GATEWAY_*` environment variables (pydantic-settings). Bottom of the stack."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_file=None, extra="ignore")

    # Comma-separated registry files, applied in order: the ten-model registry first, then overlays.
    registry: str = "model_registry.yaml"
    host: str = "127.0.0.1"
    port: int = 8080
    log_level: str = "info"

    connect_timeout_s: float = Field(default=5.0, gt=0)
    # Generous: a long generation may legitimately take minutes between bytes on a busy CPU engine.
    read_timeout_s: float = Field(default=600.0, gt=0)
    pool_max_connections: int = Field(default=1000, gt=0)
    pool_max_keepalive: int = Field(default=200, ge=0)
    retry_after_s: int = Field(default=5, ge=1)

    # Tenants file; unset = open access (any bearer token is one anonymous development tenant).
    tenants: Path | None = None
    # Where audit records go: "stdout", or a file path (JSON lines, appended).
    audit_sink: str = "stdout"
    # Shared rate-limit state across replicas; unset = limits per process.
    redis_url: str | None = None
    # When Redis is unreachable: keep serving on local limits (default) or refuse with 503.
    ratelimit_fail_closed: bool = False

    @property
    def registry_paths(self) -> list[Path]:
        return [Path(part.strip()) for part in self.registry.split(",") if part.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
