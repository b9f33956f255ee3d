"""deploy/ through the tools an operator's pipeline would run: kubectl kustomize, kubernetes-validate
(strict, the oldest Kubernetes we support), checkov, hadolint. Installed by `make k8s-tools` (the
Makefile's `test` depends on it): nothing here downloads anything."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

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
