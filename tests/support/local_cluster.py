"""A stand-in for what a cluster gives a rendered container, so its command runs as a local process:
Service DNS names and ports -> 127.0.0.1 and free ports (cluster DNS, kube-proxy); ConfigMap and
Secret mounts -> their rendered contents in a directory, the weights volume -> local test assets laid
out as the init container leaves them, emptyDirs -> directories (the kubelet). Nothing else changes."""

from __future__ import annotations

import base64
import shutil
import sys
from pathlib import Path

from tests.conftest import TEST_MODELS, smollm2_gguf
from tests.support.processes import free_port

# Weights as the init container leaves them on the volume, per Deployment (local stand-ins).
WEIGHTS = {
    "llamacpp-smollm2-135m-instruct": lambda: {"SmolLM2-135M-Instruct.Q4_1.gguf": smollm2_gguf()},
    "seq2seq-flan-t5-small": lambda: {"weights": TEST_MODELS / "tiny-t5"},
    "vllm-llama-2-7b-chat": lambda: {"weights": TEST_MODELS / "tiny-llama"},
    "vllm-mpt-7b-instruct": lambda: {"weights": TEST_MODELS / "tiny-mpt"},
}
# The images' executables, as installed here.
EXECUTABLES = {"python": [sys.executable], "python3": [sys.executable], "gateway": [sys.executable, "-m", "gateway"],
               "hf": [str(Path(sys.executable).parent / "hf")]}  # huggingface_hub's CLI (the downloader)


class Cluster:
    """Stands in for DNS, kube-proxy and the kubelet's volume mounts."""

    def __init__(self, docs: list[dict], tmp: Path) -> None:
        self.docs, self.tmp = docs, tmp
        self.deployments = [d for d in docs if d["kind"] == "Deployment"]
        self.local_port: dict[str, int] = {}  # Deployment name -> the port its container listens on here
        self.addresses: dict[str, str] = {}  # "name.ns.svc.cluster.local:port" -> "127.0.0.1:local"
        for svc in (d for d in docs if d["kind"] == "Service"):
            target = self._deployment_for(svc)
            port = self.local_port.setdefault(target["metadata"]["name"], free_port())
            for spelling in _dns_names(svc):
                self.addresses[f"{spelling}:{svc['spec']['ports'][0]['port']}"] = f"127.0.0.1:{port}"

    def _deployment_for(self, svc: dict) -> dict:
        selector = svc["spec"]["selector"].items()
        return next(d for d in self.deployments if d["metadata"]["namespace"] == svc["metadata"]["namespace"]
                    and selector <= d["spec"]["template"]["metadata"]["labels"].items())

    def rewrite(self, text: str, mounts: dict[str, Path]) -> str:
        for address, local in sorted(self.addresses.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(address, local)
        return ",".join(_under(part, mounts) for part in text.split(","))  # GATEWAY_REGISTRY is a list

    def mounts(self, deployment: dict, container: dict) -> dict[str, Path]:
        """Each of the container's mount paths -> a local directory holding what the kubelet would mount."""
        name = deployment["metadata"]["name"]
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"].get("volumes", [])}
        found: dict[str, Path] = {}
        for mount in container.get("volumeMounts", []):
            volume, local = volumes[mount["name"]], self.tmp / name / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume or "secret" in volume:
                for file, text in self._files(volume).items():
                    (local / file).write_text(self.rewrite(text, {}))
            elif "persistentVolumeClaim" in volume:
                for file, source in WEIGHTS.get(name, dict)().items():  # none: an empty volume
                    if not (local / file).exists():
                        (local / file).symlink_to(source)
            elif mount["mountPath"] == "/dev/shm":  # the machine's own, shared harmlessly
                continue
            found[mount["mountPath"]] = local
        return found

    def _files(self, volume: dict) -> dict[str, str]:
        kind, ref = ("ConfigMap", volume["configMap"]["name"]) if "configMap" in volume else \
            ("Secret", volume["secret"]["secretName"])
        obj = next((d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == ref), None)
        if obj is None:  # only an optional Secret may be absent (hf-token); the kubelet mounts it empty
            assert volume.get("secret", {}).get("optional"), f"{kind} {ref} is not rendered"
            return {}
        if kind == "Secret":
            return {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}
        return dict(obj.get("data", {}))

    def argv_env(self, deployment: dict, container: dict,
                 python: str = sys.executable) -> tuple[list[str], dict[str, str]]:
        """The container's command line and env as a local process (`python`: the image's interpreter)."""
        mounts = self.mounts(deployment, container)
        argv = [self.rewrite(a, mounts) for a in [*container.get("command", []), *container.get("args", [])]]
        executables = {**EXECUTABLES, "python": [python], "python3": [python]}
        argv = [*(executables.get(argv[0]) or [shutil.which(argv[0]) or argv[0]]), *argv[1:]]
        own_port = str(container["ports"][0]["containerPort"]) if container.get("ports") else None
        local = str(self.local_port[deployment["metadata"]["name"]])
        for index, value in enumerate(argv[:-1]):  # the container's own port flag -> its local port
            if value in ("--port", "--port=") and argv[index + 1] == own_port:
                argv[index + 1] = local
        argv = ["127.0.0.1" if a == "0.0.0.0" else a for a in argv]
        env = {e["name"]: self.rewrite(e["value"], mounts) for e in container.get("env", []) if "value" in e}
        return argv, env


def _under(path: str, mounts: dict[str, Path]) -> str:
    """A path inside a mount -> the same path in its local directory (the longest mount wins, once)."""
    for mount_path in sorted(mounts, key=len, reverse=True):
        if path == mount_path or path.startswith(mount_path.rstrip("/") + "/"):
            return str(mounts[mount_path]) + path[len(mount_path):]
    return path


def _dns_names(svc: dict) -> list[str]:
    name, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
    return [f"{name}.{ns}.svc.cluster.local", f"{name}.{ns}.svc", f"{name}.{ns}"]


