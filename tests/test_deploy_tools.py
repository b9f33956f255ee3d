"""deploy/ through the tools an operator's pipeline would run: kubectl kustomize, kubernetes-validate
(strict, the oldest Kubernetes we support), checkov, hadolint. Installed by `make k8s-tools` (the
Makefile's `test` depends on it): nothing here downloads anything."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.deploy import OVERLAYS, ROOT, built, tool

OLDEST_KUBERNETES = "1.30.0"  # preStop `sleep` (beta, on by default since 1.30) sets the floor
CRD_KINDS = ("ServiceMonitor", "PrometheusRule")  # Prometheus Operator: no schema in kubernetes-validate


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
    overlay = tmp_path / "gke"
    overlay.mkdir()
    up = os.path.relpath(ROOT, overlay)
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{up}/deploy/overlays/prod]\ncomponents: [{up}/deploy/components/gke]\n")
    result = _run([tool("kubectl"), "kustomize", str(overlay)])
    assert result.returncode == 0, result.stderr
    deployments = [d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "Deployment"]
    gpu_pods = [d for d in deployments if d["metadata"]["labels"].get("llm-gateway/engine") == "vllm"]
    assert gpu_pods
    for deployment in gpu_pods:
        terms = deployment["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert [e["key"] for t in terms for e in t["matchExpressions"]] == ["cloud.google.com/gke-accelerator"]
    manifest = tmp_path / "gke.yaml"
    manifest.write_text(result.stdout)
    validated = _run([tool("kubernetes-validate"), "--strict", "-k", OLDEST_KUBERNETES, "--quiet", str(manifest)])
    assert validated.returncode == 0, validated.stdout + validated.stderr
