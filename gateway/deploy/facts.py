"""Facts derived from one registry backend: its Service address, its GPU class, its sizes, how long
its longest request may run (and so how long its pods must be given to drain).

Each is a small pure function, so the tests can hold the rendered manifests against the same facts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.backends.timeouts import timeouts_for
from gateway.registry.schema import Backend, Engine, Model
from gateway.settings import Settings

DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
DEFAULT_NAMESPACE = "llm-models"
# GPUs without bfloat16: vLLM must run them in float16 (`--dtype half`), else it refuses to start.
NO_BF16 = ("T4", "V100")


@dataclass(frozen=True)
class ServiceAddress:
    name: str
    namespace: str
    port: int


def service_address(backend: Backend) -> ServiceAddress | str:
    """The Service the gateway calls for this backend, or why its URL names none.

    Accepted: http://NAME.NAMESPACE.svc.cluster.local:PORT and http://NAME:PORT (the overlay's namespace).
    """
    parts = urlsplit(backend.base_url)
    host, port = parts.hostname or "", parts.port
    if parts.scheme != "http" or port is None or parts.path not in ("", "/"):
        return "not http://<service>:<port> (scheme http, an explicit port, no path)"
    labels = host.split(".")
    if len(labels) == 5 and labels[2:] == ["svc", "cluster", "local"]:
        name, namespace = labels[0], labels[1]
    elif len(labels) == 1:
        name, namespace = labels[0], DEFAULT_NAMESPACE
    else:
        return f"host {host!r} is not a Service address (<name>.<namespace>.svc.cluster.local or <name>)"
    for label in (name, namespace):
        if not DNS_1035.match(label):
            return f"{label!r} is not a DNS-1035 label (lower case, starts with a letter, <= 63 chars)"
    return ServiceAddress(name, namespace, port)


@dataclass(frozen=True)
class GpuClass:
    name: str  # e.g. "A10G"
    memory_gb: int  # per GPU, as in the registry's type "A10G-24GB"

    @property
    def bf16(self) -> bool:
        return self.name not in NO_BF16

    @property
    def min_memory_mib(self) -> int:
        """GPU Feature Discovery's `nvidia.com/gpu.memory` (MiB) a node's GPU must exceed.

        90 % of the nominal size: GFD reports usable memory (an A10G "24GB" says 23028, an A100-80GB 81920).
        """
        return int(self.memory_gb * 1024 * 0.9)


def gpu_class(model: Model) -> GpuClass | None:
    gpu = model.hardware.min_gpu
    if gpu.count == 0:
        return None
    match = re.fullmatch(r"([A-Za-z0-9]+)-(\d+)GB", gpu.type)
    if match is None:
        raise ValueError(f"GPU type {gpu.type!r} is not <NAME>-<N>GB")
    return GpuClass(match.group(1), int(match.group(2)))


def shm_gib(model: Model) -> int:
    """Memory-backed /dev/shm: NCCL and vLLM's workers exchange tensors through it under tensor
    parallelism (Docker's 64 MiB default fails with TP > 1); 1 GiB per GPU rank, at least 1."""
    return max(1, model.hardware.tensor_parallel_size)


def weights_bytes(model: Model, backend: Backend) -> float | None:
    """What the downloader fetches: the GGUF file, or the checkpoint in its one stored format and dtype
    (params x bytes per parameter); None when the registry does not say (the renderer refuses)."""
    if backend.gguf is not None:
        # A 4-bit GGUF is about a third of the fp16 size where the registry gives no file size.
        return (backend.gguf.size_gb or model.hardware.fp16_weight_gb / 3.3) * 1e9
    if model.weights is None:
        return None
    return model.params_b * 1e9 * model.weights.bytes_per_param


def weights_volume_gib(model: Model, backend: Backend) -> int:
    """The weights volume of one pod: the files, 10 % for the filesystem, 1 GiB for tokenizer and configs."""
    size = weights_bytes(model, backend)
    assert size is not None, f"{model.id}: no weights format (checked by the renderer)"
    return math.ceil(size * 1.1 / 2**30) + 1


def startup_budget_s(model: Model, backend: Backend) -> int:
    """How long a start may take before the startup probe gives up: reading the weights from the
    volume (about 20 s per fp16 GB, conservative for network disks) plus engine warm-up (CUDA graphs)."""
    per_gb = 5 if backend.gguf is not None else 20
    return 120 + math.ceil(model.hardware.fp16_weight_gb * per_gb)


def engine_memory_gib(model: Model, backend: Backend) -> int:
    """Host memory for the engine processes (without /dev/shm, added by the caller)."""
    if backend.engine.value == "vllm":
        # The API server and engine core (Python, CUDA libraries, a shard in flight while loading), plus
        # one worker process per tensor-parallel rank, each with its own CUDA context and libraries.
        return 10 + 6 * model.hardware.tensor_parallel_size
    if backend.engine.value == "llama.cpp":
        # A 4-bit GGUF is mapped into memory (~fp16/3.5), plus the KV cache and the server.
        return math.ceil(model.hardware.fp16_weight_gb / 3.5) + 1
    # seq2seq: float32 on CPU (T5 must not run in float16): twice the fp16 size, plus the runtime.
    return math.ceil(model.hardware.fp16_weight_gb * 2) + 2


# Draining. The Inference Extension's vLLM manifest gives a pod (worst request + preStop) x 1.5 to go;
# the same rule here, with the worst request read from the registry's timeouts (role defaults, model
# overrides), so a rollout never cuts a generation that was allowed to run.
ENGINE_PRESTOP_S = 15  # the gateway's DNS refresh (5 s) + cluster DNS TTL (5 s) + a probe: no new requests
GATEWAY_PRESTOP_S = 10  # Service endpoints, kube-proxy and ingress controllers drop the pod meanwhile
DRAIN_FACTOR = 1.5
_DEFAULTS = Settings.model_construct()  # the settings' defaults, never this process's environment


def worst_request_s(model: Model, backend: Backend) -> int:
    """The longest a request to this backend may run: a stream's total timeout, or a non-streamed
    answer's generation timeout, whichever is longer."""
    timeouts = timeouts_for(_DEFAULTS, backend, model.timeouts)
    return math.ceil(max(timeouts.total_s, timeouts.generation_s))


def grace_s(worst_s: int, prestop_s: int) -> int:
    return math.ceil((worst_s + prestop_s) * DRAIN_FACTOR)


def shuts_down_gracefully(backend: Backend) -> bool:
    """Engines told how long to drain on SIGTERM (vLLM's --shutdown-timeout, our worker's); llama.cpp's
    server (uvicorn) finishes its requests on SIGTERM with no bound but the pod's grace period."""
    return backend.engine in (Engine.VLLM, Engine.SEQ2SEQ)
