"""Facts derived from one registry backend: its Service address, its GPU class, its sizes.

Each is a small pure function, so the tests can hold the rendered manifests against the same facts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.registry.schema import Backend, Model

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


def weights_pvc_gib(model: Model, backend: Backend) -> int:
    """Disk for the downloaded weights. A full repo download: many 2023 repos hold both .bin and
    .safetensors copies, hence twice the fp16 size; a GGUF 4-bit file is about a quarter of it."""
    if backend.gguf is not None:
        return math.ceil(model.hardware.fp16_weight_gb / 3) + 1
    return math.ceil(model.hardware.fp16_weight_gb * 2.2) + 2


def startup_budget_s(model: Model, backend: Backend) -> int:
    """How long a start may take before the startup probe gives up: reading the weights from the
    volume (about 20 s per fp16 GB, conservative for network disks) plus engine warm-up (CUDA graphs)."""
    per_gb = 5 if backend.gguf is not None else 20
    return 120 + math.ceil(model.hardware.fp16_weight_gb * per_gb)


def engine_memory_gib(model: Model, backend: Backend) -> int:
    """Host memory for the engine process (without /dev/shm, added by the caller)."""
    if backend.engine.value == "vllm":
        # Python + CUDA libraries + one safetensors shard in flight while loading onto the GPU.
        return 16
    if backend.engine.value == "llama.cpp":
        # A 4-bit GGUF is mapped into memory (~fp16/3.5), plus the KV cache and the server.
        return math.ceil(model.hardware.fp16_weight_gb / 3.5) + 1
    # seq2seq: float32 on CPU (T5 must not run in float16): twice the fp16 size, plus the runtime.
    return math.ceil(model.hardware.fp16_weight_gb * 2) + 2
