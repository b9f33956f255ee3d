"""The timeouts that apply to one backend call: role defaults from settings, model overrides on top."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.registry.schema import Backend, Role, Timeouts
from gateway.settings import Settings


@dataclass(frozen=True)
class CallTimeouts:
    connect_s: float
    first_byte_s: float  # request sent -> response headers
    idle_s: float  # between two chunks of the body
    total_s: float  # request sent -> last byte (streams)
    generation_s: float  # request sent -> whole answer (non-streamed)


def timeouts_for(settings: Settings, backend: Backend, overrides: Timeouts) -> CallTimeouts:
    role = "primary" if backend.role is Role.PRIMARY else "fallback"
    return CallTimeouts(
        connect_s=overrides.connect_s or getattr(settings, f"{role}_connect_timeout_s"),
        first_byte_s=overrides.first_byte_s or getattr(settings, f"{role}_first_byte_timeout_s"),
        idle_s=overrides.idle_s or getattr(settings, f"{role}_idle_timeout_s"),
        total_s=overrides.total_s or getattr(settings, f"{role}_total_timeout_s"),
        generation_s=overrides.generation_s or getattr(settings, f"{role}_generation_timeout_s"),
    )
