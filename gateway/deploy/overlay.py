"""What each overlay gets generated: one kustomize Component with its engines, its images, its deployed
view and the gateway's drain; and the optional KEDA and Inference Extension components for its vLLM pools.

    deploy/overlays/<name>/models/          Component: the overlay's backends (../../../models/<svc>), the
                                            `images` list for every placeholder, the gateway-deployed
                                            ConfigMap (deployed.yaml), the gateway's drain, the
                                            monitoring `release` label
    deploy/overlays/<name>/keda/            Component (optional): a KEDA ScaledObject per vLLM pool, on
                                            vLLM's own metrics; the StatefulSets' replicas left to it
    deploy/overlays/<name>/inference-pool/  Component (optional): an InferencePool per vLLM pool

List `models` after the other components in the overlay: a component's transformers apply to what was
accumulated before it (kustomize), and its `images` must reach every container.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from gateway.deploy.facts import GATEWAY_PRESTOP_S, ServiceAddress, grace_s, worst_request_s
from gateway.deploy.fleet import Overlay, Placement
from gateway.deploy.images import GATEWAY, POSTGRES, REDIS, engine_key, image_entries
from gateway.deploy.manifests import selector
from gateway.registry.schema import Engine

COMPONENT = {"apiVersion": "kustomize.config.k8s.io/v1alpha1", "kind": "Component"}
MONITORING_GROUP = "monitoring.coreos.com"
EPP_PORT = 9002  # the endpoint picker's gRPC ext-proc port (the Inference Extension's default)


def image_keys(run: list[Placement]) -> list[str]:
    return sorted({GATEWAY, REDIS, POSTGRES, *(engine_key(p.backend.engine, p.backend.engine_version) for p in run)})


def gateway_drain_s(run: list[Placement]) -> int:
    """The gateway serves every model of the overlay: it waits for the longest request any may run."""
    return max((worst_request_s(p.model, p.backend) for p in run), default=0)


def deployed_file(name: str, run: list[Placement]) -> dict[str, Any]:
    return {"overlay": name, "discovery": "dns", "backends": sorted(p.backend.id for p in run)}


def models_component(name: str, overlay: Overlay, run: list[Placement], addresses: dict[str, ServiceAddress],
                     gateway_version: str) -> dict[str, Any]:
    drain = gateway_drain_s(run)
    gateway_patch = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "gateway", "namespace": "llm-gateway"},
        "spec": {"template": {"spec": {
            "terminationGracePeriodSeconds": grace_s(drain, GATEWAY_PRESTOP_S),
            "containers": [{"name": "gateway",
                            "env": [{"name": "GATEWAY_DRAIN_TIMEOUT_S", "value": str(drain)}],
                            "lifecycle": {"preStop": {"sleep": {"seconds": GATEWAY_PRESTOP_S}}}}]}}},
    }
    release = [{"op": "add", "path": "/metadata/labels/release", "value": overlay.monitoring.release}]
    return {
        **COMPONENT,
        "resources": sorted(f"../../../models/{addresses[p.backend.id].name}" for p in run),
        # The deployed view: the gateway knows only these backends (GATEWAY_DEPLOYED).
        "configMapGenerator": [{"name": "gateway-deployed", "namespace": "llm-gateway", "files": ["deployed.yaml"]}],
        "images": image_entries(image_keys(run), overlay.images, gateway_version),
        "patches": [
            # Drain for as long as the longest request may run; grace = (drain + preStop) x 1.5.
            {"target": {"kind": "Deployment", "name": "gateway", "namespace": "llm-gateway"},
             "patch": _yaml_patch(gateway_patch)},
            # kube-prometheus-stack selects monitoring objects by its release label (a no-op without them).
            {"target": {"group": MONITORING_GROUP}, "patch": json.dumps(release)},
        ],
    }


def vllm_pools(run: list[Placement]) -> list[Placement]:
    return [p for p in run if p.backend.engine is Engine.VLLM]


def keda_component(overlay: Overlay, pools: list[Placement],
                   addresses: dict[str, ServiceAddress]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The component and its ScaledObjects (production-stack's triggers: waiting requests per pod, and
    KV-cache use). KEDA's HPA owns the replicas: the StatefulSets' own count is removed."""
    objects, patches = [], []
    for placement in pools:
        address = addresses[placement.backend.id]
        pods = f'namespace="{address.namespace}",pod=~"{address.name}-[0-9]+"'
        low = max(1, placement.entry.replicas)
        high = placement.entry.max_replicas or max(2, 2 * low)

        def trigger(query: str, threshold: str) -> dict[str, Any]:
            return {"type": "prometheus", "metadata": {
                "serverAddress": overlay.monitoring.prometheus_url, "query": query, "threshold": threshold}}

        objects.append({
            "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
            "metadata": {"name": address.name, "namespace": address.namespace, "labels": selector(address)},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": address.name},
                "minReplicaCount": low, "maxReplicaCount": max(high, low),
                "pollingInterval": 15, "cooldownPeriod": 360,
                # Sums, not averages: KEDA's AverageValue divides by the pod count itself.
                "triggers": [trigger(f"sum(vllm:num_requests_waiting{{{pods}}})", "5"),
                             trigger(f"sum(vllm:kv_cache_usage_perc{{{pods}}})", "0.8")],
                # A new engine pod takes minutes (weights, CUDA graphs): add fast, remove slowly, never flap.
                "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                    "scaleUp": {"stabilizationWindowSeconds": 60,
                                "policies": [{"type": "Pods", "value": 2, "periodSeconds": 120}]},
                    "scaleDown": {"stabilizationWindowSeconds": 900,
                                  "policies": [{"type": "Pods", "value": 1, "periodSeconds": 600}]}}}},
            },
        })
        patches.append({"target": {"kind": "StatefulSet", "name": address.name, "namespace": address.namespace},
                        "patch": json.dumps([{"op": "remove", "path": "/spec/replicas"}])})
    return {**COMPONENT, "resources": ["scaledobjects.yaml"], "patches": patches}, objects


def inference_pool_component(pools: list[Placement],
                             addresses: dict[str, ServiceAddress]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """An InferencePool per vLLM pool, for gateways that speak the Gateway API Inference Extension; its
    endpoint picker (`<service>-epp`) comes from that gateway's own installation."""
    objects = [{
        "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
        "metadata": {"name": addresses[p.backend.id].name, "namespace": addresses[p.backend.id].namespace,
                     "labels": selector(addresses[p.backend.id])},
        "spec": {"selector": {"matchLabels": selector(addresses[p.backend.id])},
                 "targetPorts": [{"number": addresses[p.backend.id].port}],
                 "endpointPickerRef": {"name": f"{addresses[p.backend.id].name}-epp",
                                       "port": {"number": EPP_PORT}, "failureMode": "FailClose"}},
    } for p in pools]
    return {**COMPONENT, "resources": ["inferencepools.yaml"]}, objects


def _yaml_patch(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False)
