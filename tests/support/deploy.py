"""Helpers for the deploy/ tests: the Kubernetes tools `make test` installs, and built overlays."""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ("dev", "prod")
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
CACHE = Path(os.environ.get("LLMGW_CACHE", Path.home() / ".cache" / "llm-gateway"))


def tool(name: str) -> str:
    """A tool from the venvs the Makefile builds (kubectl, kubernetes-validate, hadolint, checkov).

    Under `make test` (LLMGW_K8S_TOOLS set) a missing tool fails the test; a bare `pytest` without the
    Makefile's venvs skips, naming the target that installs it. kubectl also from PATH (a local install).
    """
    venvs = [os.environ.get("LLMGW_K8S_TOOLS", CACHE / "venv-k8s-tools"),
             os.environ.get("LLMGW_CHECKOV_VENV", CACHE / "venv-checkov-3.3.30")]  # as the Makefile
    for venv in venvs:
        path = Path(venv) / "bin" / name
        if path.is_file():
            return str(path)
    if name == "kubectl" and shutil.which("kubectl"):
        return shutil.which("kubectl")
    if os.environ.get("LLMGW_K8S_TOOLS"):
        pytest.fail(f"{name} is not installed in {venvs}: `make k8s-tools` installs it")
    pytest.skip(f"{name} not installed (`make k8s-tools`)")


@lru_cache(maxsize=None)
def built(overlay: str) -> str:
    """`kubectl kustomize deploy/overlays/<overlay>`: the YAML an apply would send."""
    result = subprocess.run([tool("kubectl"), "kustomize", str(ROOT / "deploy/overlays" / overlay)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def objects(overlay: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(built(overlay)) if doc]


def of_kind(overlay: str, kind: str) -> list[dict]:
    return [doc for doc in objects(overlay) if doc["kind"] == kind]


def workloads(overlay: str) -> list[dict]:
    return [doc for doc in objects(overlay) if doc["kind"] in WORKLOAD_KINDS]


def engine_workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS
            and d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "engine"]


def build(root: Path, tmp: Path, overlay: str, components: tuple[str, ...] = (), patches: str = "") -> list[dict]:
    """`kubectl kustomize` of an overlay under `root` with optional components on top (kustomize wants
    relative paths to reach them)."""
    where = tmp / f"with-{overlay}-{len(list(tmp.glob('with-*')))}"
    where.mkdir(parents=True)
    up = os.path.relpath(root, where)
    text = (f"apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources: [{up}/deploy/overlays/{overlay}]\n")
    if components:
        text += "components: [" + ", ".join(f"{up}/{c}" for c in components) + "]\n"
    (where / "kustomization.yaml").write_text(text + patches)
    result = subprocess.run([tool("kubectl"), "kustomize", str(where)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(deployment: dict) -> list[dict]:
    spec = deployment["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def arg(container: dict, flag: str) -> str | None:
    args = [*container.get("command", []), *container.get("args", [])]
    return args[args.index(flag) + 1] if flag in args else None


def quantity(value: str | int) -> float:
    """A Kubernetes quantity in base units (cores, bytes)."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)
