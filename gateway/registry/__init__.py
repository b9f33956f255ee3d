"""The model registry: licenses, models, hardware, engines and backends (bottom of the stack)."""

from gateway.registry.loader import NotUtf8Error, Registry, RegistryError, load_registry, read_config_text
from gateway.registry.deployed import DeployedFile, deployed_view, read_deployed
from gateway.registry.schema import Backend, CommercialUse, Engine, License, Model, Role

__all__ = [
    "Backend",
    "CommercialUse",
    "DeployedFile",
    "Engine",
    "License",
    "Model",
    "NotUtf8Error",
    "Registry",
    "RegistryError",
    "Role",
    "deployed_view",
    "load_registry",
    "read_config_text",
    "read_deployed",
]
