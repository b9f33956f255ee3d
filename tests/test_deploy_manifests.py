"""What kubectl and the schema validators cannot see in deploy/, but an API server or a pod would reject:
names and port names, selectors, GPU and memory arithmetic, Service addresses, engine names and
versions; and that the committed manifests are what `gateway deploy render` makes (no drift)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from gateway.cli import main
from gateway.deploy import render
from gateway.deploy.facts import engine_memory_gib, gpu_class, service_address
from gateway.registry import load_registry
from gateway.registry.engines import why_engine_cannot_serve
from gateway.registry.schema import Engine
from tests.support.deploy import (OVERLAYS, ROOT, WORKLOAD_KINDS, arg, containers, engine_workloads, objects, of_kind,
                                  pod_spec, quantity, workloads)

DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # IANA_SVC_NAME, <= 15 characters
REGISTRY = load_registry([ROOT / "model_registry.yaml", ROOT / "deploy/overlays/dev/registry/smollm2.yaml"])
SERVED_FLAG = {Engine.VLLM: "--served-model-name", Engine.LLAMA_CPP: "--model_alias",
               Engine.SEQ2SEQ: "--served-model-name"}


def _engine_deployments(overlay: str) -> list[dict]:
    return engine_workloads(objects(overlay))


def _backend_of(deployment: dict):
    backend_id = deployment["metadata"]["labels"]["llm-gateway/backend"]
    model = REGISTRY.model(deployment["metadata"]["labels"]["llm-gateway/model"])
    return model, next(b for b in model.backends if b.id == backend_id)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_names_labels_and_port_names_are_what_an_api_server_accepts(overlay: str) -> None:
    for obj in objects(overlay):
        name, kind = obj["metadata"]["name"], obj["kind"]
        pattern = DNS_1035_LABEL if kind in ("Service", "Namespace") else DNS_1123_SUBDOMAIN
        assert pattern.match(name) and len(name) <= (63 if kind in ("Service", "Namespace") else 253), (kind, name)
        if kind in WORKLOAD_KINDS:  # pod names add a hash or an ordinal: keep the name a label
            assert DNS_1123_LABEL.match(name) and len(name) <= 63 - 6, name
        labelled = [obj["metadata"].get("labels") or {}]
        if kind in WORKLOAD_KINDS:
            labelled.append(obj["spec"]["template"]["metadata"]["labels"])
            for container in containers(obj):
                assert DNS_1123_LABEL.match(container["name"]) and len(container["name"]) <= 63
                for port in container.get("ports", []):
                    assert PORT_NAME.match(port["name"]) and len(port["name"]) <= 15, port
        for port in obj.get("spec", {}).get("ports", []) if kind == "Service" else []:
            assert PORT_NAME.match(port["name"]) and len(port["name"]) <= 15, port
        for labels in labelled:
            for key, value in labels.items():
                assert len(key.split("/")[-1]) <= 63 and len(value) <= 63 and LABEL_VALUE.match(value), (key, value)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_the_pod_template_labels(overlay: str) -> None:
    deployments = workloads(overlay)
    for deployment in deployments:
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for svc in of_kind(overlay, "Service"):
        ns, selector = svc["metadata"]["namespace"], svc["spec"]["selector"].items()
        matched = [d for d in deployments if d["metadata"]["namespace"] == ns
                   and selector <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matched) == 1, f"Service {svc['metadata']['name']} selects {len(matched)} workloads"
        ports = {p["name"] for c in containers(matched[0]) for p in c.get("ports", [])}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_gpu_request_equals_limit_and_memory_counts_dev_shm(overlay: str) -> None:
    for deployment in workloads(overlay):
        spec = deployment["spec"]["template"]["spec"]
        memory_volumes = sum(quantity(v["emptyDir"].get("sizeLimit", 0)) for v in spec.get("volumes", [])
                             if v.get("emptyDir", {}).get("medium") == "Memory")
        for container in containers(deployment):
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            for resource, wanted in requests.items():
                assert quantity(wanted) <= quantity(limits[resource]), (container["name"], resource)
            if "nvidia.com/gpu" in requests or "nvidia.com/gpu" in limits:
                assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
        if deployment["metadata"]["labels"].get("app.kubernetes.io/component") != "engine":
            continue
        model, backend = _backend_of(deployment)
        engine = spec["containers"][0]
        shm = quantity(engine_memory_gib(model, backend) * 2**30) + memory_volumes
        assert quantity(engine["resources"]["limits"]["memory"]) >= shm, deployment["metadata"]["name"]
        gpu = gpu_class(model)
        if backend.engine is Engine.VLLM and gpu is not None:
            assert engine["resources"]["limits"]["nvidia.com/gpu"] == str(model.hardware.min_gpu.count)
            term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            assert term["nodeSelectorTerms"][0]["matchExpressions"][0]["key"] == "nvidia.com/gpu.memory"
            assert arg(engine, "--tensor-parallel-size") == str(model.hardware.tensor_parallel_size)
            assert arg(engine, "--max-model-len") == str(model.context_length)
            assert (arg(engine, "--dtype") == "half") == (not gpu.bf16)
        else:
            assert "nvidia.com/gpu" not in engine["resources"]["limits"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_backend_url_resolves_to_exactly_one_service_on_the_right_port(overlay: str) -> None:
    services = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in of_kind(overlay, "Service")}
    for deployment in _engine_deployments(overlay):
        model, backend = _backend_of(deployment)
        address = service_address(backend)
        matches = [s for key, s in services.items() if key == (address.namespace, address.name)]
        assert len(matches) == 1, backend.id
        assert [p["port"] for p in matches[0]["spec"]["ports"]] == [address.port]
        assert matches[0]["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert _engine_deployments(overlay)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engines_serve_the_name_the_gateway_sends_at_a_version_that_serves_the_model(overlay: str) -> None:
    images = yaml.safe_load((ROOT / f"deploy/overlays/{overlay}/models/kustomization.yaml").read_text())["images"]
    tags = {i["newName"] + ":" + i["newTag"] for i in images if "newTag" in i}
    for deployment in _engine_deployments(overlay):
        model, backend = _backend_of(deployment)
        engine = deployment["spec"]["template"]["spec"]["containers"][0]
        assert arg(engine, SERVED_FLAG[backend.engine]) == backend.engine_model(model.id)[1]
        assert engine["image"] in tags, engine["image"]
        version = engine["image"].rsplit(":", 1)[1].removeprefix("v")
        assert Version(version) == Version(backend.engine_version)
        support = next(s for s in model.engines if s.engine is backend.engine)
        assert Version(version) in SpecifierSet(support.versions), (backend.id, version)
        assert why_engine_cannot_serve(backend.engine, version, model.architecture) is None
        probes = {engine[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
        assert probes == {"/docs" if backend.engine is Engine.LLAMA_CPP else "/health"}
        assert "initialDelaySeconds" not in engine["startupProbe"]


def test_render_check_is_clean_and_rendering_is_deterministic(capsys: pytest.CaptureFixture) -> None:
    assert main(["deploy", "render", "--check", "--root", str(ROOT)]) == 0, capsys.readouterr().err
    assert render(ROOT, ROOT / "deploy/fleet.yaml") == render(ROOT, ROOT / "deploy/fleet.yaml")


def test_render_check_names_every_drifting_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _copy_inputs(tmp_path)
    assert main(["deploy", "render", "--root", str(root)]) == 0
    (root / "deploy/models/vllm-llama-2-7b-chat/service.yaml").write_text("edited by hand\n")
    (root / "deploy/overlays/prod/models/deployed.yaml").write_text("overlay: prod\nbackends: []\n")
    (root / "deploy/models/stale/deployment.yaml").parent.mkdir()
    (root / "deploy/models/stale/deployment.yaml").write_text("left over\n")
    capsys.readouterr()
    assert main(["deploy", "render", "--check", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "deploy/models/vllm-llama-2-7b-chat/service.yaml" in err and "deploy/models/stale/deployment.yaml" in err
    assert "deploy/overlays/prod/models/deployed.yaml" in err


def test_bad_input_is_one_line_per_problem_naming_file_entry_and_field(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    root = _copy_inputs(tmp_path)
    fleet = root / "deploy/fleet.yaml"
    fleet.write_text("overlays:\n  prod:\n    registry_overlays: [bad.yaml]\n    models:\n"
                     "      - {model: no-such-model}\n      - {model: llama-7b, backends: [vllm-llama-7b-0]}\n")
    (root / "bad.yaml").write_text(
        "models:\n  - id: llama-7b\n    backends:\n      - {id: vllm-llama-7b-0, engine: vllm, "
        "engine_version: '0.32.0', url: 'http://vllm.example.com:8000'}\n")
    assert main(["deploy", "render", "--root", str(root)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert any("fleet.yaml: overlays.prod.models[0].model: unknown model 'no-such-model'" in l for l in lines), lines
    assert any("bad.yaml" in l and "models[llama-7b].backends[0].url" in l and "not a Service" in l
               for l in lines), lines
    # An engine version that cannot serve the architecture: the registry's own one-line error.
    (root / "bad.yaml").write_text(
        "models:\n  - id: mpt-7b-instruct\n    backends:\n      - {id: vllm-mpt-7b-instruct-0, engine: vllm, "
        "engine_version: '0.32.0', url: 'http://vllm-mpt-7b-instruct.llm-models.svc.cluster.local:8000'}\n")
    fleet.write_text("overlays:\n  prod:\n    registry_overlays: [bad.yaml]\n    models: [{model: mpt-7b-instruct}]\n")
    assert main(["deploy", "render", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "mpt-7b-instruct" in err and "0.32.0" in err and "engine_version" in err, err


def _copy_inputs(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "deploy/overlays/dev/registry").mkdir(parents=True)
    for rel in ("model_registry.yaml", "pyproject.toml", "deploy/fleet.yaml", "deploy/overlays/dev/registry/smollm2.yaml"):
        (root / rel).write_text((ROOT / rel).read_text())
    (root / "deploy/models").mkdir()
    return root


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_locked_down_and_its_scratch_space_fits_its_limits(overlay: str) -> None:
    for deployment in workloads(overlay):
        spec = deployment["spec"]["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
        disk = sum(quantity(v["emptyDir"].get("sizeLimit", 0)) for v in spec.get("volumes", [])
                   if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory")
        assert sum(quantity(c["resources"]["limits"]["ephemeral-storage"]) for c in spec["containers"]) > disk
        for container in containers(deployment):
            ctx = container["securityContext"]
            assert ctx["runAsNonRoot"] and ctx["readOnlyRootFilesystem"] and not ctx["allowPrivilegeEscalation"]
            assert ctx["capabilities"]["drop"] == ["ALL"] and ctx["seccompProfile"]["type"] == "RuntimeDefault"
        if deployment["metadata"]["labels"].get("llm-gateway/engine") == "llama.cpp":
            engine = spec["containers"][0]
            assert arg(engine, "--n_threads") == engine["resources"]["limits"]["cpu"]
            assert arg(engine, "--interrupt_requests") == "false"
