"""A stand-in for what a cluster gives a rendered container, so its command runs as a local process:
Service DNS names and ports -> 127.0.0.1 and free ports (cluster DNS, kube-proxy); ConfigMap and
Secret mounts -> their rendered contents in a directory, Secret and ConfigMap env references -> their
values, `$(VAR)` in env, command and args -> expanded as the kubelet does; volume claims -> local
directories, the weights one holding local test assets laid out as the init container leaves them;
emptyDirs -> directories (the kubelet). Nothing else changes. With `sandbox=True` the process also runs
as the container's UID on a read-only root with only its volumes writable (tests/support/sandbox.py).
"""

from __future__ import annotations

import base64
import re
import shutil
import sys
from pathlib import Path

from tests.conftest import TEST_MODELS, smollm2_gguf
from tests.support import sandbox
from tests.support.processes import free_port

# Weights as the init container leaves them on the volume, per workload (local stand-ins).
WEIGHTS = {
    "llamacpp-smollm2-135m-instruct": lambda: {"SmolLM2-135M-Instruct.Q4_1.gguf": smollm2_gguf()},
    "seq2seq-flan-t5-small": lambda: {"weights": TEST_MODELS / "tiny-t5"},
    "vllm-llama-2-7b-chat": lambda: {"weights": TEST_MODELS / "tiny-llama"},
    "vllm-mpt-7b-instruct": lambda: {"weights": TEST_MODELS / "tiny-mpt"},
}
# The images' executables, as installed here (the postgres image's entrypoint: a stand-in doing the
# same first-start work).
EXECUTABLES = {"python": [sys.executable], "python3": [sys.executable], "gateway": [sys.executable, "-m", "gateway"],
               "docker-entrypoint.sh": [sys.executable, str(Path(__file__).with_name("pg_entrypoint.py"))]}
# Containers whose program wants its UID to be a named user (initdb): the postgres image gives its
# unnamed UID a passwd entry (nss_wrapper); here this machine's postgres user stands in.
LOCAL_USERS = {"postgres": "postgres"}
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's `$(VAR)` expansion: defined names are replaced, `$$` escapes, others stay."""
    return _VAR.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


class Cluster:
    """Stands in for DNS, kube-proxy and the kubelet's volume mounts and env."""

    def __init__(self, docs: list[dict], tmp: Path, secrets: dict[str, dict[str, str]] | None = None) -> None:
        self.docs, self.tmp = docs, tmp
        self.extra_secrets = secrets or {}  # Secrets an operator creates (not rendered): name -> data
        self.workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
        self.deployments = self.workloads  # the name the older tests use
        self.local_port: dict[str, int] = {}  # workload name -> the port its container listens on here
        self.addresses: dict[str, str] = {}  # "name.ns.svc.cluster.local:port" -> "127.0.0.1:local"
        for svc in (d for d in docs if d["kind"] == "Service"):
            target = self.workload_for(svc)
            port = self.local_port.setdefault(target["metadata"]["name"], free_port())
            for spelling in _dns_names(svc):
                self.addresses[f"{spelling}:{svc['spec']['ports'][0]['port']}"] = f"127.0.0.1:{port}"

    def workload(self, name: str) -> dict:
        return next(w for w in self.workloads if w["metadata"]["name"] == name)

    def workload_for(self, svc: dict) -> dict:
        selector = svc["spec"]["selector"].items()
        return next(d for d in self.workloads if d["metadata"]["namespace"] == svc["metadata"]["namespace"]
                    and selector <= d["spec"]["template"]["metadata"]["labels"].items())

    def rewrite(self, text: str, mounts: dict[str, Path]) -> str:
        for address, local in sorted(self.addresses.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(address, local)
        return ",".join(_under(part, mounts) for part in text.split(","))  # GATEWAY_REGISTRY is a list

    def volumes(self, workload: dict) -> dict[str, dict]:
        spec = workload["spec"]
        found = {v["name"]: v for v in spec["template"]["spec"].get("volumes", [])}
        for claim in spec.get("volumeClaimTemplates", []):
            found[claim["metadata"]["name"]] = {"name": claim["metadata"]["name"], "persistentVolumeClaim": {}}
        return found

    def mounts(self, workload: dict, container: dict) -> dict[str, Path]:
        """Each of the container's mount paths -> a local directory holding what the kubelet would mount."""
        name = workload["metadata"]["name"]
        volumes = self.volumes(workload)
        found: dict[str, Path] = {}
        for mount in container.get("volumeMounts", []):
            volume, local = volumes[mount["name"]], self.tmp / name / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume or "secret" in volume:
                for file, text in self._files(volume).items():
                    (local / file).write_text(self.rewrite(text, {}))
            elif "persistentVolumeClaim" in volume and mount.get("readOnly"):  # what the engine reads
                for file, source in WEIGHTS.get(name, dict)().items():  # none: an empty volume
                    _lay_out(source, local / file)
            found[mount["mountPath"]] = local
        return found

    def _object(self, kind: str, name: str) -> dict | None:
        return next((d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name), None)

    def secret(self, name: str) -> dict[str, str] | None:
        """A Secret's data by its name, or by the name its generator was given (before the hash suffix)."""
        if name in self.extra_secrets:
            return dict(self.extra_secrets[name])
        obj = self._object("Secret", name) or next(
            (d for d in self.docs if d["kind"] == "Secret" and re.fullmatch(rf"{re.escape(name)}-[a-z0-9]{{10}}",
                                                                           d["metadata"]["name"])), None)
        if obj is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}

    def _files(self, volume: dict) -> dict[str, str]:
        if "configMap" in volume:
            ref, optional = volume["configMap"]["name"], volume["configMap"].get("optional", False)
            obj = self._object("ConfigMap", ref)
            data = dict(obj.get("data", {})) if obj else None
            items = volume["configMap"].get("items")
        else:
            ref, optional = volume["secret"]["secretName"], volume["secret"].get("optional", False)
            data, items = self.secret(ref), volume["secret"].get("items")
        if data is None:  # only an optional one may be absent (hf-token); the kubelet mounts it empty
            assert optional, f"{ref} is not rendered (nor given to Cluster as an operator's Secret)"
            return {}
        return {item["path"]: data[item["key"]] for item in items} if items else data

    def env(self, workload: dict, container: dict, mounts: dict[str, Path]) -> dict[str, str]:
        env: dict[str, str] = {}
        for entry in container.get("env", []):
            if "value" in entry:
                env[entry["name"]] = self.rewrite(expand(entry["value"], env), mounts)
                continue
            ref = entry["valueFrom"].get("secretKeyRef") or entry["valueFrom"].get("configMapKeyRef")
            data = (self.secret(ref["name"]) if "secretKeyRef" in entry["valueFrom"]
                    else (self._object("ConfigMap", ref["name"]) or {}).get("data"))
            if data is None or ref["key"] not in data:
                assert ref.get("optional"), f"{workload['metadata']['name']}: {entry['name']}: {ref} not rendered"
                continue
            env[entry["name"]] = self.rewrite(data[ref["key"]], mounts)
        return env

    def argv_env(self, deployment: dict, container: dict, python: str = sys.executable,
                 sandboxed: bool = False) -> tuple[list[str], dict[str, str]]:
        """The container's command line and env as a local process (`python`: the image's interpreter)."""
        mounts = self.mounts(deployment, container)
        env = self.env(deployment, container, mounts)
        words = [expand(a, env) for a in [*container.get("command", []), *container.get("args", [])]]
        argv = [self.rewrite(a, mounts) for a in words]
        executables = {**EXECUTABLES, "python": [python], "python3": [python]}
        argv = [*(executables.get(argv[0]) or [shutil.which(argv[0]) or argv[0]]), *argv[1:]]
        own_port = str(container["ports"][0]["containerPort"]) if container.get("ports") else None
        local = str(self.local_port.get(deployment["metadata"]["name"], own_port))
        for index, value in enumerate(argv[:-1]):  # the container's own port flag -> its local port
            if value in ("--port", "--tls-port") and argv[index + 1] == own_port:
                argv[index + 1] = local
        argv = ["127.0.0.1" if a == "0.0.0.0" else a for a in argv]
        argv = [f"port={local}" if a == f"port={own_port}" else a for a in argv]  # postgres -c port=...
        argv = ["listen_addresses=127.0.0.1" if a == "listen_addresses=*" else a for a in argv]
        if sandboxed:
            argv, env = self._sandboxed(deployment, container, argv, env, mounts)
        return argv, env

    def _sandboxed(self, workload: dict, container: dict, argv: list[str], env: dict[str, str],
                   mounts: dict[str, Path]) -> tuple[list[str], dict[str, str]]:
        import pwd

        ctx = {**workload["spec"]["template"]["spec"].get("securityContext", {}), **container.get("securityContext", {})}
        uid, gid = ctx["runAsUser"], ctx.get("runAsGroup", ctx["runAsUser"])
        if container["name"] in LOCAL_USERS:
            user = pwd.getpwnam(LOCAL_USERS[container["name"]])
            uid, gid = user.pw_uid, user.pw_gid
        volumes = self.volumes(workload)
        writable, over = [], {}
        for mount in container.get("volumeMounts", []):
            local = mounts[mount["mountPath"]]
            volume = volumes[mount["name"]]
            if "configMap" not in volume and "secret" not in volume and not mount.get("readOnly"):
                sandbox.owned_dir(local, uid, gid)
                writable.append(local)
            else:
                local.chmod(0o755)
            if Path(mount["mountPath"]).is_dir():  # a path this machine has: bind the volume over it
                over[mount["mountPath"]] = local
        wrapped = sandbox.sandboxed(argv, uid=uid, gid=gid, writable=writable, over=over, scratch=self.tmp)
        return wrapped, sandbox.clean_env(env)


def _lay_out(source: Path, target: Path) -> None:
    """As the downloader leaves it: files the pod's UID can read (test checkpoints are copied: small, and
    saved 0600 by their generator); a large single file (a GGUF) is linked."""
    if target.exists() or target.is_symlink():
        return
    if source.is_dir():
        shutil.copytree(source, target)
        for path in target.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
    else:
        target.symlink_to(source)


def _under(path: str, mounts: dict[str, Path]) -> str:
    """A path inside a mount -> the same path in its local directory (the longest mount wins, once); also
    a path given as a URL query value (`?ssl_ca_certs=/etc/...`)."""
    for mount_path in sorted(mounts, key=len, reverse=True):
        if path == mount_path or path.startswith(mount_path.rstrip("/") + "/"):
            return str(mounts[mount_path]) + path[len(mount_path):]
        inside = "=" + mount_path.rstrip("/") + "/"
        if inside in path:
            return path.replace(inside, "=" + str(mounts[mount_path]) + "/")
    return path


def _dns_names(svc: dict) -> list[str]:
    name, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
    return [f"{name}.{ns}.svc.cluster.local", f"{name}.{ns}.svc", f"{name}.{ns}"]
