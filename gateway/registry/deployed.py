"""The deployed view of the registry: what one deployment runs (`GATEWAY_DEPLOYED`).

The registry lists every variant of the ten families and every backend they could have; a Kubernetes
overlay runs a few of them. `gateway deploy render` writes, per overlay, the backend ids it runs:

    # deployed.yaml
    overlay: prod
    discovery: dns           # each backend's host is a headless Service: one upstream per pod
    backends: [vllm-llama-2-7b-chat-0, llamacpp-llama-2-7b-chat-0, ...]

With it the gateway keeps only those backends, and only the models that have one: nothing else is
listed (`/v1/models`), probed, exported as a metric or chosen as a substitution twin. A model the
registry has but this deployment does not run is remembered as `undeployed`, so that asking for it is
a 404 that says so, not a 503 for a backend nobody started.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from gateway.errors import field_path
from gateway.registry.loader import NotUtf8Error, Registry, RegistryError, read_config_text


class DeployedFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    overlay: str = ""
    # Applied to every listed backend: "dns" where each backend URL names a headless Service.
    discovery: Literal["url", "dns"] | None = None
    backends: tuple[str, ...]


def read_deployed(path: Path, registry: Registry) -> DeployedFile:
    """The file, checked against the registry; RegistryError names the file, the entry and the field."""
    problems: list[str] = []
    try:
        deployed = DeployedFile.model_validate(yaml.safe_load(read_config_text(path)))
    except OSError as exc:
        raise RegistryError([f"{path}: cannot read: {exc.strerror}"]) from None
    except (NotUtf8Error, yaml.YAMLError) as exc:
        raise RegistryError([f"{path}: not valid YAML: {exc}"]) from None
    except ValidationError as exc:
        raise RegistryError([f"{path}: field '{field_path(e['loc'])}': {e['msg']}" for e in exc.errors()]) from None
    known = {backend.id for model in registry.models.values() for backend in model.backends}
    for index, backend_id in enumerate(deployed.backends):
        if backend_id not in known:
            problems.append(f"{path}: field 'backends.{index}': {backend_id!r} is no backend of the registry")
    if problems:
        raise RegistryError(problems)
    return deployed


def deployed_view(registry: Registry, deployed: DeployedFile) -> Registry:
    """The registry as this deployment runs it: the listed backends only, and the models that have one."""
    wanted = set(deployed.backends)
    models, undeployed = {}, {}
    for model_id, model in registry.models.items():
        backends = tuple(b if deployed.discovery is None else b.model_copy(update={"discovery": deployed.discovery})
                         for b in model.backends if b.id in wanted)
        if backends:
            models[model_id] = model.model_copy(update={"backends": backends})
        else:
            undeployed[model_id] = model
    return replace(registry, models=models, undeployed=undeployed)
