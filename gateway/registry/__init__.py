"""The model registry: licenses, models, hardware, engines and backends (bottom of the stack)."""

from gateway.registry.loader import NotUtf8Error, Registry, RegistryError, load_registry, read_config_text
from gateway.registry.schema import Backend, CommercialUse, Engine, License, Model, Role

__all__ = [
    "Backend",
    "CommercialUse",
    "Engine",
    "License",
    "Model",
    "NotUtf8Error",
    "Registry",
    "RegistryError",
    "Role",
    "load_registry",
    "read_config_text",
]
