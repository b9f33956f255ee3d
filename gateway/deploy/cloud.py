"""Cloud-specific placement, as optional kustomize components (never in the base).

GKE: its own GPU driver installation runs no GPU Feature Discovery, so the `nvidia.com/gpu.memory`
affinity the base renders would match no node. The component replaces it, per GPU backend, with GKE's
accelerator label for the registry's GPU class (derived, like everything else, from `min_gpu`). It
adds no runtime class: GKE's GPU nodes run containers with the NVIDIA runtime by default (the
gpu-operator component's `runtimeClassName: nvidia` would be rejected there: no such RuntimeClass).
Patches for backends an overlay does not run match nothing (kustomize leaves them out).
"""

from __future__ import annotations

import json
from typing import Any

from gateway.deploy.facts import ServiceAddress, gpu_class
from gateway.deploy.fleet import Placement
from gateway.registry.schema import Engine

# Registry GPU class -> GKE accelerators that hold it (GCP has no A10G: the L4 has the same 24 GB).
GKE_ACCELERATORS = {
    ("T4", 16): ["nvidia-tesla-t4", "nvidia-l4", "nvidia-tesla-a100", "nvidia-a100-80gb", "nvidia-h100-80gb"],
    ("A10G", 24): ["nvidia-l4", "nvidia-tesla-a100", "nvidia-a100-80gb", "nvidia-h100-80gb"],
    ("A100", 40): ["nvidia-tesla-a100", "nvidia-a100-80gb", "nvidia-h100-80gb"],
    ("A100", 80): ["nvidia-a100-80gb", "nvidia-h100-80gb"],
}


def gke_component(placements: list[Placement], addresses: dict[str, ServiceAddress]) -> dict[str, Any]:
    patches = []
    for placement in placements:
        gpu = gpu_class(placement.model)
        if placement.backend.engine is not Engine.VLLM or gpu is None:
            continue
        accelerators = GKE_ACCELERATORS.get((gpu.name, gpu.memory_gb))
        if accelerators is None:
            raise ValueError(f"{placement.backend.id}: no GKE accelerator known for {gpu.name}-{gpu.memory_gb}GB")
        term = {"key": "cloud.google.com/gke-accelerator", "operator": "In", "values": accelerators}
        address = addresses[placement.backend.id]
        affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [term]}]}}}
        patches.append({
            "target": {"kind": "StatefulSet", "name": address.name, "namespace": address.namespace},
            "patch": _json_patch([{"op": "replace", "path": "/spec/template/spec/affinity", "value": affinity}]),
        })
    return {"apiVersion": "kustomize.config.k8s.io/v1alpha1", "kind": "Component", "patches": patches}


def _json_patch(ops: list[dict[str, Any]]) -> str:
    return json.dumps(ops, sort_keys=True)
