"""The model registry: licenses, models, hardware, engines and backends (bottom of the stack)."""

from gateway.registry.loader import Registry, RegistryError, load_registry
from gateway.registry.schema import Backend, CommercialUse, Engine, License, Model, Role

__all__ = [
    "Backend",
    "CommercialUse",
    "Engine",
    "License",
    "Model",
    "Registry",
    "RegistryError",
    "Role",
    "load_registry",
]
