"""Which configuration files a command reads: the ones the server would read, and it says so.

In order: the command's flags (`--registry`, repeated or comma-separated like GATEWAY_REGISTRY;
`--tenants`), then GATEWAY_REGISTRY / GATEWAY_TENANTS, then, run from a checkout with neither set, what
`make run` serves (the ten-model registry, the local overlay and the local demo tenants), and last the
server's own default (model_registry.yaml, no tenants file). The server itself never picks up the local
demo files by itself: their keys are public.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.settings import Settings

LOCAL_REGISTRY = (Path("model_registry.yaml"), Path("deploy/local/registry.yaml"))
LOCAL_TENANTS = Path("deploy/local/tenants.yaml")
LOCAL_ORIGIN = "make run's: a checkout, and no --registry or GATEWAY_REGISTRY"


@dataclass(frozen=True)
class ConfigFiles:
    registry: list[Path]
    registry_origin: str
    tenants: Path | None
    tenants_origin: str

    def describe(self) -> str:
        """One line for stderr: every file read and where its name came from."""
        registry = ", ".join(map(str, self.registry))
        tenants = str(self.tenants) if self.tenants else "none"
        if self.registry_origin == LOCAL_ORIGIN and self.tenants_origin == LOCAL_ORIGIN:
            return f"config ({LOCAL_ORIGIN}): registry {registry}; tenants {tenants}"
        return f"config: registry {registry} ({self.registry_origin}); tenants {tenants} ({self.tenants_origin})"


def registry_paths(values: Sequence[str | Path]) -> list[Path]:
    """`--registry` values, each a file or a comma-separated list of files (as GATEWAY_REGISTRY)."""
    return [Path(part.strip()) for value in values for part in str(value).split(",") if part.strip()]


def resolve(registry_flags: Sequence[str | Path] | None, tenants_flag: Path | None,
            settings: Settings | None = None, cwd: Path | None = None) -> ConfigFiles:
    settings = settings or Settings()
    cwd = cwd or Path.cwd()
    from_env = settings.model_fields_set  # the fields an environment variable set
    if registry_flags:
        registry, registry_origin = registry_paths(registry_flags), "from --registry"
    elif "registry" in from_env:
        registry, registry_origin = settings.registry_paths, "from GATEWAY_REGISTRY"
    elif all((cwd / path).is_file() for path in LOCAL_REGISTRY):
        registry, registry_origin = list(LOCAL_REGISTRY), LOCAL_ORIGIN
    else:
        registry, registry_origin = settings.registry_paths, "the default: no --registry or GATEWAY_REGISTRY"
    if tenants_flag is not None:
        return ConfigFiles(registry, registry_origin, tenants_flag, "from --tenants")
    if settings.tenants is not None:
        return ConfigFiles(registry, registry_origin, settings.tenants, "from GATEWAY_TENANTS")
    if registry_origin == LOCAL_ORIGIN and (cwd / LOCAL_TENANTS).is_file():
        return ConfigFiles(registry, registry_origin, LOCAL_TENANTS, LOCAL_ORIGIN)
    return ConfigFiles(registry, registry_origin, None, "no --tenants or GATEWAY_TENANTS")


def missing_registry_hint(paths: Sequence[Path], cwd: Path | None = None) -> str | None:
    """For a registry file that does not exist: where its name came from, so the fix is obvious."""
    cwd = cwd or Path.cwd()
    missing = [str(p) for p in paths if not (cwd / p).exists()]
    if not missing:
        return None
    return (f"registry file not found: {', '.join(missing)}. Registry files are GATEWAY_REGISTRY's "
            f"comma-separated list (default model_registry.yaml; for the CLI also --registry), relative "
            f"to the working directory ({cwd}).")
