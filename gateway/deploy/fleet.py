"""`deploy/fleet.yaml`: which backends each Kubernetes overlay runs, how many replicas, extra engine args,
which images, and where its monitoring stack is.

Everything else about a backend's pods comes from the registry's hardware tags (see `manifests.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import field_path
from gateway.registry import Registry
from gateway.registry.schema import Backend, Model


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FleetEntry(_Strict):
    model: str
    # Backend ids of the model to run; empty: all of them (GPU primary and CPU fallbacks).
    backends: tuple[str, ...] = ()
    replicas: int = Field(default=1, ge=0)
    # Extra engine arguments, appended after the derived ones (e.g. --gpu-memory-utilization).
    args: tuple[str, ...] = ()
    # CPU cores for CPU engines (llama.cpp threads = this limit); GPU engines ignore it.
    cpus: int = Field(default=4, ge=1)
    # The KEDA component's upper bound on pods (default: twice `replicas`, at least 2).
    max_replicas: int | None = Field(default=None, ge=1)


class ImageRef(_Strict):
    """Where one image placeholder points: a repository (`name`), and a `tag` or a `digest` (a digest
    wins: the bytes cannot change under the same reference)."""

    name: str | None = None
    tag: str | None = None
    digest: str | None = Field(default=None, pattern=r"^sha256:[0-9a-f]{64}$")


class Monitoring(_Strict):
    # The label kube-prometheus-stack's Prometheus selects ServiceMonitors, PodMonitors and rules by
    # (its Helm release name).
    release: str = "kube-prometheus-stack"
    # The Prometheus that KEDA's triggers query (the keda component).
    prometheus_url: str = "http://kube-prometheus-stack-prometheus.monitoring.svc:9090"


class Overlay(_Strict):
    # Registry overlays this overlay's gateway loads after model_registry.yaml (paths from the repo root).
    registry_overlays: tuple[str, ...] = ()
    models: tuple[FleetEntry, ...] = ()
    # Image placeholder (gateway, seq2seq-0.1.0, vllm-0.32.0, llamacpp-0.3.36, redis, postgres) -> image.
    # The only place images are set: one kustomize `images` list per overlay reaches every container.
    images: dict[str, ImageRef] = {}
    monitoring: Monitoring = Monitoring()


class FleetFile(_Strict):
    # Registry files every overlay's gateway loads, in order (paths from the repo root).
    registry: tuple[str, ...] = ("model_registry.yaml",)
    overlays: dict[str, Overlay]


@dataclass(frozen=True)
class Placement:
    """One backend to render: its model, the registry entry, and the fleet's choices."""

    model: Model
    backend: Backend
    entry: FleetEntry
    overlays: tuple[str, ...] = field(default=())


def read_fleet(path: Path, problems: list[str]) -> FleetFile | None:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        return FleetFile.model_validate(document)
    except OSError as exc:
        problems.append(f"{path}: cannot read: {exc.strerror}")
    except yaml.YAMLError as exc:
        problems.append(f"{path}: not valid YAML: {exc}")
    except ValidationError as exc:
        problems.extend(f"{path}: {field_path(e['loc'])}: {e['msg']}" for e in exc.errors())
    return None


def placements(path: Path, fleet: FleetFile, registry: Registry, problems: list[str]) -> list[Placement]:
    """Every backend some overlay runs, once, with the overlays that run it (sorted by backend id)."""
    found: dict[str, Placement] = {}
    for overlay_name, overlay in sorted(fleet.overlays.items()):
        for index, entry in enumerate(overlay.models):
            where = f"{path}: overlays.{overlay_name}.models[{index}]"
            model = registry.model(entry.model)
            if model is None:
                problems.append(f"{where}.model: unknown model {entry.model!r}")
                continue
            by_id = {b.id: b for b in model.backends}
            for unknown in sorted(set(entry.backends) - set(by_id)):
                problems.append(f"{where}.backends: {unknown!r} is not a backend of {model.id}")
            chosen = [by_id[b] for b in entry.backends if b in by_id] if entry.backends else list(model.backends)
            if not chosen:
                problems.append(f"{where}.model: {model.id} has no backends to deploy")
            for backend in chosen:
                before = found.get(backend.id)
                if before is not None and before.entry != entry:
                    problems.append(f"{where}: {backend.id} is also placed differently by another overlay")
                    continue
                names = (*before.overlays, overlay_name) if before else (overlay_name,)
                found[backend.id] = Placement(model, backend, entry, names)
    return [found[key] for key in sorted(found)]

