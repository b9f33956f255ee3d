"""deploy/ through the tools an operator's pipeline would run: kubectl kustomize, kubernetes-validate
(strict, the oldest Kubernetes we support), checkov, hadolint. Installed by `make k8s-tools` (the
Makefile's `test` depends on it): nothing here downloads anything."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.deploy import OVERLAYS, ROOT, build, built, tool

OLDEST_KUBERNETES = "1.30.0"  # preStop `sleep` (beta, on by default since 1.30) sets the floor
# No schema in kubernetes-validate: checked against tests/support/crd_schemas.py (test_deploy_crds.py).
CRD_KINDS = ("ServiceMonitor", "PodMonitor", "PrometheusRule", "Cluster", "ScaledObject", "InferencePool",
             "Certificate", "Issuer", "Gateway", "HTTPRoute")


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubectl_kustomize_builds_every_overlay(overlay: str) -> None:
    text = built(overlay)
    assert "kind: Deployment" in text and "name: gateway" in text


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_validate_strict_passes_for_the_oldest_supported_kubernetes(overlay: str, tmp_path: Path) -> None:
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(built(overlay))
    result = _run([tool("kubernetes-validate"), "--strict", "-k", OLDEST_KUBERNETES, "--quiet", str(manifest)])
    assert result.returncode == 0, result.stdout + result.stderr
    for line in (result.stdout + result.stderr).splitlines():  # only the CRDs may lack a schema
        assert any(kind in line for kind in CRD_KINDS), line


def test_checkov_passes_with_the_commented_skip_list(tmp_path: Path) -> None:
    for overlay in OVERLAYS:
        (tmp_path / f"{overlay}.yaml").write_text(built(overlay))
    result = _run([tool("checkov"), "--config-file", str(ROOT / "deploy/checkov.yaml"), "-d", str(tmp_path)],
                  env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "BC_SKIP_MAPPING": "TRUE"})
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = _run([tool("hadolint"), str(ROOT / "Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_gke_component_swaps_gpu_feature_discovery_for_gke_accelerator_labels(tmp_path: Path) -> None:
    """Optional components build on top of prod (kustomize wants relative paths to reach them)."""
    docs = build(ROOT, tmp_path, "prod", ("deploy/components/gke",))
    gpu_pods = [d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["labels"].get("llm-gateway/engine") == "vllm"]
    assert gpu_pods
    for workload in gpu_pods:
        terms = workload["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert [e["key"] for t in terms for e in t["matchExpressions"]] == ["cloud.google.com/gke-accelerator"]
    manifest = tmp_path / "gke.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    validated = _run([tool("kubernetes-validate"), "--strict", "-k", OLDEST_KUBERNETES, "--quiet", str(manifest)])
    assert validated.returncode == 0, validated.stdout + validated.stderr


# Every optional component, on the overlay it is meant for: each must build and validate strictly.
OPTIONAL = {"prod": ("deploy/components/gke", "deploy/components/gpu-operator", "deploy/components/redis-tls",
                     "deploy/components/gateway-api", "deploy/overlays/prod/keda", "deploy/overlays/prod/inference-pool"),
            "dev": ("deploy/components/redis-tls", "deploy/components/ingress")}


@pytest.mark.parametrize("overlay", sorted(OPTIONAL))
def test_every_optional_component_builds_and_validates_strictly(overlay: str, tmp_path: Path) -> None:
    for component in OPTIONAL[overlay]:
        manifest = tmp_path / f"{Path(component).name}.yaml"
        manifest.write_text(yaml.safe_dump_all(build(ROOT, tmp_path, overlay, (component,))))
        result = _run([tool("kubernetes-validate"), "--strict", "-k", OLDEST_KUBERNETES, "--quiet", str(manifest)])
        assert result.returncode == 0, (component, result.stdout + result.stderr)
        for line in (result.stdout + result.stderr).splitlines():
            assert any(kind in line for kind in CRD_KINDS), (component, line)
