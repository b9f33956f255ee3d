"""Issue 22's failures, read off the built overlays as a platform engineer applying them would: images,
GKE, scaling, per-pod engines and their volumes, weights, monitoring. Each test names the failure it
guards ("Why: ..."); each failed on the manifests before this branch."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from gateway.cli import main
from gateway.registry import load_registry
from tests.support.deploy import (OVERLAYS, ROOT, arg, build, containers, engine_workloads, objects, of_kind, pod_spec,
                                  quantity, workloads)

REGISTRY = load_registry([ROOT / "model_registry.yaml", ROOT / "deploy/overlays/dev/registry/smollm2.yaml"])
FLEET = yaml.safe_load((ROOT / "deploy/fleet.yaml").read_text())


def _model_and_backend(workload: dict):
    model = REGISTRY.model(workload["metadata"]["labels"]["llm-gateway/model"])
    backend_id = workload["metadata"]["labels"]["llm-gateway/backend"]
    return model, next(b for b in model.backends if b.id == backend_id)


def _copy_repo_inputs(tmp_path: Path) -> Path:
    """The renderer's inputs and the hand-written deploy/ tree, to render and build a changed fleet."""
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "deploy", root / "deploy")
    for rel in ("model_registry.yaml", "pyproject.toml"):
        shutil.copy(ROOT / rel, root / rel)
    return root


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_an_image_its_overlay_maps(overlay: str) -> None:
    """Why: the prod image override renamed `llm-gateway` only in some containers: seven weight-download
    init containers and the FLAN-T5-xl worker kept `llm-gateway:0.1.0`, a name no registry has."""
    images = [c["image"] for w in workloads(overlay) for c in containers(w)]
    assert images and not [i for i in images if i.startswith("llm-gateway/")], "placeholders left unmapped"
    for image in images:
        assert re.fullmatch(r"[a-z0-9./-]+(:[\w.-]+|@sha256:[0-9a-f]{64})", image), image
    # The gateway's image also runs every weights downloader: one override must reach them all.
    gateway = pod_spec(next(w for w in workloads(overlay) if w["metadata"]["name"] == "gateway"))["containers"][0]
    downloaders = {c["image"] for w in engine_workloads(objects(overlay)) for c in pod_spec(w)["initContainers"]}
    assert downloaders == {gateway["image"]}, (gateway["image"], downloaders)
    # Our images (gateway, worker) come from the same registry as the gateway's, wherever the overlay puts it.
    registry = gateway["image"].rsplit("/", 1)[0] if "/" in gateway["image"] else ""
    ours = [i for i in images if re.search(r"(^|/)llm-gateway[-\w]*[:@]", i)]
    assert {i.rsplit("/", 1)[0] if "/" in i else "" for i in ours} == {registry}, ours
    named = {ref["name"] for ref in (FLEET["overlays"][overlay].get("images") or {}).values() if ref.get("name")}
    assert {i.split("@")[0].rsplit(":", 1)[0] for i in ours} <= named or not named, ours


def test_a_digest_pins_one_engine_version_and_not_the_other(tmp_path: Path) -> None:
    """Why: one `vllm/vllm-openai` digest entry pinned 0.32.0 and 0.27.1 alike."""
    root = _copy_repo_inputs(tmp_path)
    fleet = yaml.safe_load((root / "deploy/fleet.yaml").read_text())
    d32, d27 = "sha256:" + "3" * 64, "sha256:" + "2" * 64
    fleet["overlays"]["prod"]["images"] = {"vllm-0.32.0": {"digest": d32}, "vllm-0.27.1": {"digest": d27}}
    (root / "deploy/fleet.yaml").write_text(yaml.safe_dump(fleet))
    assert main(["deploy", "render", "--root", str(root)]) == 0
    by_version = {}
    for workload in engine_workloads(build(root, tmp_path, "prod")):
        labels = workload["metadata"]["labels"]
        if labels["llm-gateway/engine"] == "vllm":
            by_version.setdefault(labels["llm-gateway/engine-version"], set()).add(pod_spec(workload)["containers"][0]["image"])
    assert by_version == {"0.32.0": {f"vllm/vllm-openai@{d32}"}, "0.27.1": {f"vllm/vllm-openai@{d27}"}}
    fleet["overlays"]["prod"]["images"] = {"vllm-0.23.0": {"digest": d32}}  # a version prod does not run
    (root / "deploy/fleet.yaml").write_text(yaml.safe_dump(fleet))
    assert main(["deploy", "render", "--root", str(root)]) == 1


def test_prod_on_gke_has_no_runtime_class_and_the_gpu_operator_adds_it_to_vllm_only(tmp_path: Path) -> None:
    """Why: on GKE prod pods were rejected: the gpu-operator component (runtimeClassName `nvidia`) was
    always included."""
    for docs in (objects("prod"), build(ROOT, tmp_path, "prod", ("deploy/components/gke",))):
        assert not [w["metadata"]["name"] for w in workloads_of(docs) if "runtimeClassName" in pod_spec(w)]
    with_operator = build(ROOT, tmp_path, "prod", ("deploy/components/gpu-operator",))
    classes = {w["metadata"]["name"]: pod_spec(w).get("runtimeClassName") for w in workloads_of(with_operator)}
    assert {n for n, c in classes.items() if c == "nvidia"} == {n for n in classes if n.startswith("vllm-")}
    assert {c for n, c in classes.items() if not n.startswith("vllm-")} == {None}


def workloads_of(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_hpa_owns_the_gateway_count_pdbs_let_one_go_and_scaling_does_not_flap(overlay: str) -> None:
    """Why: `spec.replicas: 2` beside the HPA (every apply reset it), PDB `minAvailable: 1`, no HPA behavior."""
    (hpa,) = of_kind(overlay, "HorizontalPodAutoscaler")
    target = next(w for w in workloads(overlay) if w["kind"] == hpa["spec"]["scaleTargetRef"]["kind"]
                  and w["metadata"]["name"] == hpa["spec"]["scaleTargetRef"]["name"])
    assert "replicas" not in target["spec"]
    down = hpa["spec"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300 and all(p["value"] <= 1 for p in down["policies"] if p["type"] == "Pods")
    assert hpa["spec"]["behavior"]["scaleUp"]["policies"]
    budgets = of_kind(overlay, "PodDisruptionBudget")
    assert budgets and all(b["spec"].get("maxUnavailable") == 1 and "minAvailable" not in b["spec"] for b in budgets)
    covered = {(b["metadata"]["namespace"], tuple(sorted(b["spec"]["selector"]["matchLabels"].items()))) for b in budgets}
    for workload in workloads(overlay):  # every workload has one (engines included)
        labels = workload["spec"]["template"]["metadata"]["labels"].items()
        assert any(ns == workload["metadata"]["namespace"] and set(sel) <= labels for ns, sel in covered), \
            workload["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engines_sit_behind_headless_services_and_the_gateway_routes_per_pod(overlay: str) -> None:
    """Why: an engine backend was a ClusterIP Service URL, so least-load, prefix affinity, concurrency caps
    and ejection acted on a Service, not on the pods behind it."""
    deployed = yaml.safe_load((ROOT / f"deploy/overlays/{overlay}/models/deployed.yaml").read_text())
    assert deployed["discovery"] == "dns"
    engines = engine_workloads(objects(overlay))
    assert sorted(w["metadata"]["labels"]["llm-gateway/backend"] for w in engines) == deployed["backends"]
    services = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in of_kind(overlay, "Service")}
    for workload in engines:
        svc = services[(workload["metadata"]["namespace"], workload["spec"]["serviceName"])]
        assert svc["spec"]["clusterIP"] == "None" and not svc["spec"].get("publishNotReadyAddresses")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_engine_replica_gets_a_weights_volume_of_its_own(overlay: str) -> None:
    """Why: the weights volume was ReadWriteOnce and shared, so replicas > 1 could not start."""
    for workload in engine_workloads(objects(overlay)):
        assert workload["kind"] == "StatefulSet"
        assert not [v for v in pod_spec(workload)["volumes"] if "persistentVolumeClaim" in v]
        (claim,) = workload["spec"]["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == "weights" and claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert not of_kind(overlay, "PersistentVolumeClaim")
    if overlay == "prod":  # and prod does run more than one
        assert max(w["spec"].get("replicas", 1) for w in engine_workloads(objects(overlay))) > 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_downloads_fetch_the_engine_files_at_a_pinned_commit_or_refuse(overlay: str) -> None:
    """Why: weight downloads fetched whole repos at revision `main` (silent changes, 2-3x the bytes)."""
    from gateway.registry.schema import COMMIT_HASH

    for workload in engine_workloads(objects(overlay)):
        model, backend = _model_and_backend(workload)
        (download,) = pod_spec(workload)["initContainers"]
        argv = [*download["command"], *download["args"]]
        revision = arg(download, "--revision")
        assert "main" not in argv and "master" not in argv
        if backend.gguf is not None:
            assert revision == backend.gguf.revision and arg(download, "--file") == backend.gguf.file
        elif model.hf_revision is None:  # no verified commit: the downloader refuses (test_deploy_weights)
            assert revision is None
        else:
            assert revision == model.hf_revision and COMMIT_HASH.match(revision)
            includes = [argv[i + 1] for i, a in enumerate(argv) if a == "--include"]
            fmt, other = model.weights.format, {"safetensors": "bin", "bin": "safetensors"}[model.weights.format]
            assert f"*.{fmt}" in includes and not [p for p in includes if p.endswith(other)], includes


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_weights_volumes_are_sized_from_the_stored_files(overlay: str) -> None:
    """Why: volumes were sized for whole repos (twice the fp16 size), whatever the files and dtype."""
    from gateway.deploy.facts import weights_bytes

    for workload in engine_workloads(objects(overlay)):
        model, backend = _model_and_backend(workload)
        size = quantity(workload["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"])
        files = weights_bytes(model, backend)
        assert files <= size <= files * 1.2 + 2 * 2**30, (model.id, size / 2**30, files / 2**30)
        if model.weights is not None and model.weights.dtype == "float32":
            assert files == pytest.approx(model.params_b * 4e9)


def test_vllm_memory_grows_with_tensor_parallel_size(tmp_path: Path) -> None:
    """Why: vLLM's memory request was 16 GiB whatever the tensor-parallel size (Falcon-180B on 8 GPUs: 24 GiB)."""
    from gateway.deploy.facts import engine_memory_gib

    falcon = REGISTRY.model("falcon-180b")
    assert falcon.hardware.tensor_parallel_size == 8
    small = REGISTRY.model("llama-2-7b-chat")
    assert engine_memory_gib(falcon, falcon.backends[0]) >= 8 * 4 + engine_memory_gib(small, small.backends[0]) / 2
    root = _copy_repo_inputs(tmp_path)
    (root / "deploy/fleet.yaml").write_text(yaml.safe_dump({"overlays": {"prod": {"models": [
        {"model": "falcon-180b", "backends": [falcon.backends[0].id]}]}}}))
    (root / "model_registry.yaml").write_text((root / "model_registry.yaml").read_text().replace(
        "hf_repo: tiiuae/falcon-180B\n", "hf_repo: tiiuae/falcon-180B\n    weights: {format: safetensors, dtype: bfloat16}\n"))
    assert main(["deploy", "render", "--root", str(root)]) == 0
    (engine,) = [w for w in engine_workloads(build(root, tmp_path, "prod"))]
    limits = pod_spec(engine)["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "8" and quantity(limits["memory"]) >= 58 * 2**30


def test_vllm_alerts_a_configurable_release_label_engine_pdbs_and_priorities() -> None:
    """Why: no vLLM alerts (KV cache, queue), no `release` label for kube-prometheus-stack, no engine PDB
    or priority."""
    docs = objects("prod")
    rules = [r for d in docs if d["kind"] == "PrometheusRule" for g in d["spec"]["groups"] for r in g["rules"]]
    exprs = {r["alert"]: r["expr"] for r in rules}
    assert "vllm:kv_cache_usage_perc" in exprs["VLLMKVCacheNearlyFull"] and "0.9" in exprs["VLLMKVCacheNearlyFull"]
    assert "vllm:num_requests_waiting" in exprs["VLLMQueueGrowing"] and "deriv" in exprs["VLLMQueueGrowing"]
    release = FLEET["overlays"]["prod"].get("monitoring", {}).get("release", "kube-prometheus-stack")
    monitoring = [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert {d["kind"] for d in monitoring} == {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert all(d["metadata"]["labels"]["release"] == release for d in monitoring)
    (pods,) = [d for d in monitoring if d["kind"] == "PodMonitor"]
    assert pods["spec"]["selector"]["matchLabels"] == {"llm-gateway/engine": "vllm"}
    classes = {d["metadata"]["name"]: d["value"] for d in docs if d["kind"] == "PriorityClass"}
    for workload in workloads_of(docs):
        assert pod_spec(workload)["priorityClassName"] in classes, workload["metadata"]["name"]
    assert {pod_spec(w)["priorityClassName"] for w in engine_workloads(docs)} == {"llm-gateway-engine"}


def test_the_keda_component_scales_vllm_pools_on_their_own_metrics(tmp_path: Path) -> None:
    """What to build 6: engine autoscaling on waiting requests and KV-cache use; the StatefulSets' own
    replica count removed where KEDA's HPA owns it."""
    docs = build(ROOT, tmp_path, "prod", ("deploy/overlays/prod/keda",))
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    vllm = {w["metadata"]["name"]: w for w in engine_workloads(docs) if w["metadata"]["name"].startswith("vllm-")}
    assert set(scaled) == set(vllm)
    for name, obj in scaled.items():
        assert "replicas" not in vllm[name]["spec"]
        queries = " ".join(t["metadata"]["query"] for t in obj["spec"]["triggers"])
        assert "vllm:num_requests_waiting" in queries and "vllm:kv_cache_usage_perc" in queries and name in queries
        assert obj["spec"]["minReplicaCount"] >= 1 and obj["spec"]["maxReplicaCount"] >= obj["spec"]["minReplicaCount"]


def test_the_inference_pool_component_selects_each_vllm_pool(tmp_path: Path) -> None:
    docs = build(ROOT, tmp_path, "prod", ("deploy/overlays/prod/inference-pool",))
    pools = [d for d in docs if d["kind"] == "InferencePool"]
    vllm = [w for w in engine_workloads(docs) if w["metadata"]["name"].startswith("vllm-")]
    assert pools and len(pools) == len(vllm)
    for pool in pools:
        assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
        (pod,) = [w for w in vllm if pool["spec"]["selector"]["matchLabels"].items()
                  <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert pool["spec"]["targetPorts"] == [{"number": pod_spec(pod)["containers"][0]["ports"][0]["containerPort"]}]


def test_committed_hashes_are_commits_and_a_branch_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - id: llama-2-7b-chat\n    hf_revision: main\n")
    with pytest.raises(Exception) as error:
        load_registry([ROOT / "model_registry.yaml", bad])
    assert "bad.yaml" in str(error.value) and "hf_revision" in str(error.value) and "not a commit hash" in str(error.value)
