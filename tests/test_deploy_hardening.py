"""Issue 22's failures that are about state, drain, lock-down, config rollout, images and reach, read off
the built overlays and the Dockerfile. Each test names the failure it guards ("Why: ..."). The rendered
commands themselves run in test_deploy_runs.py, test_deploy_state.py and test_deploy_runs_vllm.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.registry import load_registry
from tests.support.deploy import (OVERLAYS, ROOT, WORKLOAD_KINDS, arg, build, containers, engine_workloads, objects,
                                  of_kind, pod_spec)

REGISTRY = load_registry([ROOT / "model_registry.yaml", ROOT / "deploy/overlays/dev/registry/smollm2.yaml"])
VAR = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _one(docs: list[dict], kind: str, name: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_has_a_password_aof_on_its_own_volume_and_a_budget(overlay: str) -> None:
    """Why: Redis was one pod with no auth, no persistence, no PDB, yet held quotas and usage counters."""
    docs = objects(overlay)
    redis = _one(docs, "StatefulSet", "redis")
    (container,) = pod_spec(redis)["containers"]
    argv = [*container["command"], *container["args"]]
    assert arg(container, "--requirepass") == "$(REDIS_PASSWORD)"
    assert _env(container)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"].startswith("redis-auth")
    assert arg(container, "--appendonly") == "yes" and arg(container, "--appendfsync") in ("everysec", "always")
    assert arg(container, "--maxmemory-policy") == "noeviction"  # never drop a quota counter silently
    data = arg(container, "--dir")
    assert [m for m in container["volumeMounts"] if m["mountPath"] == data and m["name"] == "data"]
    assert [c["metadata"]["name"] for c in redis["spec"]["volumeClaimTemplates"]] == ["data"]
    assert "--save" in argv
    _one(docs, "PodDisruptionBudget", "redis")
    gateway = pod_spec(_one(docs, "Deployment", "gateway"))["containers"][0]
    assert ":$(REDIS_PASSWORD)@" in _env(gateway)["GATEWAY_REDIS_URL"]["value"]


def test_the_redis_tls_component_serves_tls_only_and_the_gateway_verifies_it(tmp_path: Path) -> None:
    """Why: no TLS to Redis, even where the overlay wants it."""
    docs = build(ROOT, tmp_path, "prod", ("deploy/components/redis-tls",))
    (container,) = pod_spec(_one(docs, "StatefulSet", "redis"))["containers"]
    assert arg(container, "--port") == "0" and arg(container, "--tls-port") == "6379"
    assert arg(container, "--requirepass") == "$(REDIS_PASSWORD)" and arg(container, "--appendonly") == "yes"
    url = _env(pod_spec(_one(docs, "Deployment", "gateway"))["containers"][0])["GATEWAY_REDIS_URL"]["value"]
    assert url.startswith("rediss://:$(REDIS_PASSWORD)@") and "ssl_ca_certs=" in url
    certificate = _one(docs, "Certificate", "redis-tls")
    assert "redis.llm-gateway.svc.cluster.local" in certificate["spec"]["dnsNames"]


@pytest.mark.parametrize("overlay", [*OVERLAYS, "prod+redis-tls", "prod+gateway-api", "dev+redis-tls"])
def test_every_var_reference_names_an_env_entry_above_it(overlay: str, tmp_path: Path) -> None:
    """The kubelet expands `$(VAR)` only from entries defined earlier (env) or at all (command, args); a
    strategic-merge patch moves the entries it touches first, which silently breaks a reference."""
    name, _, component = overlay.partition("+")
    docs = build(ROOT, tmp_path, name, (f"deploy/components/{component}",)) if component else objects(name)
    for workload in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
        for container in containers(workload):
            seen: list[str] = []
            for entry in container.get("env", []):
                for ref in VAR.findall(entry.get("value", "")):
                    assert ref in seen, (workload["metadata"]["name"], entry["name"], ref)
                seen.append(entry["name"])
            for word in [*container.get("command", []), *container.get("args", [])]:
                for ref in VAR.findall(word):
                    assert ref in seen, (workload["metadata"]["name"], word)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_and_engines_drain_for_as_long_as_their_longest_request(overlay: str) -> None:
    """Why: the gateway drained for 30 s within a 45 s grace period (engines 60 s) while generations may
    run 600-1,800 s: every rollout cut long streams."""
    from gateway.deploy.facts import DRAIN_FACTOR, ENGINE_PRESTOP_S, worst_request_s

    docs = objects(overlay)
    engines = engine_workloads(docs)
    worst = {}
    for workload in engines:
        model = REGISTRY.model(workload["metadata"]["labels"]["llm-gateway/model"])
        backend = next(b for b in model.backends if b.id == workload["metadata"]["labels"]["llm-gateway/backend"])
        worst[workload["metadata"]["name"]] = seconds = worst_request_s(model, backend)
        spec = pod_spec(workload)
        engine = spec["containers"][0]
        prestop = engine["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert prestop == ENGINE_PRESTOP_S
        assert spec["terminationGracePeriodSeconds"] >= (seconds + prestop) * DRAIN_FACTOR
        if backend.engine.value in ("vllm", "seq2seq"):  # told to finish their requests on SIGTERM
            assert arg(engine, "--shutdown-timeout") == str(seconds)
    gateway = pod_spec(_one(docs, "Deployment", "gateway"))
    container = gateway["containers"][0]
    drain = int(_env(container)["GATEWAY_DRAIN_TIMEOUT_S"]["value"])
    assert drain >= max(worst.values()) >= 1800 - 1
    prestop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert gateway["terminationGracePeriodSeconds"] >= (drain + prestop) * DRAIN_FACTOR
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"  # 503 from the first moment of a drain


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engines_want_the_key_the_gateway_sends_and_egress_is_closed(overlay: str) -> None:
    """Why: engines accepted any caller inside the namespace (no --api-key), and no pod had an egress policy."""
    docs = objects(overlay)
    flags = {"vllm": "--api-key", "llama.cpp": "--api_key", "seq2seq": "--api-key"}
    for workload in engine_workloads(docs):
        engine = pod_spec(workload)["containers"][0]
        assert arg(engine, flags[workload["metadata"]["labels"]["llm-gateway/engine"]]) == "$(ENGINE_API_KEY)"
        assert _env(engine)["ENGINE_API_KEY"]["valueFrom"]["secretKeyRef"]["name"].startswith("engine-api-key")
    gateway = pod_spec(_one(docs, "Deployment", "gateway"))["containers"][0]
    assert _env(gateway)["GATEWAY_ENGINE_API_KEY"]["valueFrom"]["secretKeyRef"]["name"].startswith("engine-api-key")
    policies = of_kind(overlay, "NetworkPolicy")
    egress = {(p["metadata"]["namespace"], tuple(sorted(p["spec"]["podSelector"].get("matchLabels", {}).items()))): p
              for p in policies if "Egress" in p["spec"]["policyTypes"]}
    for workload in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
        labels = workload["spec"]["template"]["metadata"]["labels"].items()
        assert [p for (ns, sel), p in egress.items() if ns == workload["metadata"]["namespace"] and set(sel) <= labels], \
            f"{workload['metadata']['name']} has no egress policy"
    engines = egress[("llm-models", (("app.kubernetes.io/component", "engine"),))]["spec"]["egress"]
    ports = sorted(p["port"] for rule in engines for p in rule.get("ports", []))
    assert ports == [53, 53, 443]  # DNS, and HTTPS (the hub) outside the private ranges only
    internet = next(r for r in engines if any(p["port"] == 443 for p in r["ports"]))
    assert "10.0.0.0/8" in internet["to"][0]["ipBlock"]["except"]
    gateway_rules = egress[("llm-gateway", (("app.kubernetes.io/name", "gateway"),))]["spec"]["egress"]
    assert not [r for r in gateway_rules if any("ipBlock" in t and t["ipBlock"]["cidr"] == "0.0.0.0/0" for t in r["to"])]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_changes_reach_every_replica_without_a_manual_step(overlay: str) -> None:
    """Why: a changed tenants Secret or registry ConfigMap reached one replica (POST /admin/reload) or none.
    Generated ConfigMaps and Secrets carry a content hash in their name (a change rolls the pods); every
    config volume is a whole-directory mount the kubelet updates, and the gateway watches it."""
    docs = objects(overlay)
    gateway = pod_spec(_one(docs, "Deployment", "gateway"))
    container = gateway["containers"][0]
    assert float(_env(container)["GATEWAY_CONFIG_WATCH_S"]["value"]) <= 30
    watched = {e["name"]: e["value"] for e in container["env"] if e["name"] in ("GATEWAY_REGISTRY", "GATEWAY_TENANTS",
                                                                                "GATEWAY_DEPLOYED")}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for value in watched.values():
        for path in value.split(","):
            mount = next(m for p, m in mounts.items() if path.startswith(p + "/"))
            assert "subPath" not in mount and "subPathExpr" not in mount, mount  # subPath mounts never update
    generated = {v["configMap"]["name"] for v in gateway["volumes"] if "configMap" in v}
    assert generated and all(re.fullmatch(r"gateway-(registry|deployed)-[a-z0-9]{10}", n) for n in generated), generated


def _stages(dockerfile: str) -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current = None
    for line in dockerfile.replace("\\\n", " ").splitlines():
        match = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = match.group(1) or f"stage{len(stages)}"
            stages[current] = []
        elif current and line.strip() and not line.startswith("#"):
            stages[current].append(line.strip())
    return stages


def test_both_images_run_as_65532_and_the_gateway_image_carries_no_torch() -> None:
    """Why: the image set no USER, and the gateway image carried CPU torch it does not need."""
    stages = _stages((ROOT / "Dockerfile").read_text())
    assert list(stages)[-1] == "gateway"  # a plain `docker build .` is the gateway
    for final in ("gateway", "worker"):
        assert "USER 65532:65532" in stages[final], final
    gateway_build = " ".join(stages["build-gateway"])
    assert "seq2seq" not in gateway_build and "torch" not in gateway_build
    assert "COPY --from=build-gateway /opt/venv /opt/venv" in stages["gateway"]
    assert "COPY --from=build-worker /opt/venv /opt/venv" in stages["worker"]
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installed = re.search(r'"\.\[([a-z,]+)\]"', gateway_build).group(1).split(",")
    assert not [dep for extra in installed for dep in extras[extra] if re.match(r"(torch|transformers)\b", dep)]


@pytest.mark.parametrize("component", ["ingress", "gateway-api"])
def test_clients_reach_it_over_tls_with_timeouts_longer_than_any_stream(component: str, tmp_path: Path) -> None:
    """Why: no Ingress, HTTPRoute or TLS."""
    from gateway.deploy.facts import worst_request_s

    docs = build(ROOT, tmp_path, "dev", (f"deploy/components/{component}",))
    longest = max(worst_request_s(m, b) for m in REGISTRY.models.values() for b in m.backends)
    if component == "ingress":
        ingress = _one(docs, "Ingress", "gateway")
        notes = ingress["metadata"]["annotations"]
        assert "cert-manager.io/cluster-issuer" in notes and ingress["spec"]["tls"][0]["secretName"]
        for key in ("proxy-read-timeout", "proxy-send-timeout"):
            assert int(notes[f"nginx.ingress.kubernetes.io/{key}"]) > longest
        assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
        assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == "gateway"
    else:
        route, gateway = _one(docs, "HTTPRoute", "gateway"), _one(docs, "Gateway", "llm-gateway")
        (listener,) = gateway["spec"]["listeners"]
        certificate = _one(docs, "Certificate", "gateway-tls")
        assert listener["protocol"] == "HTTPS" and listener["tls"]["certificateRefs"][0]["name"] == certificate["spec"]["secretName"]
        timeouts = route["spec"]["rules"][0]["timeouts"]
        assert all(int(timeouts[k].rstrip("s")) > longest for k in ("request", "backendRequest"))
        assert route["spec"]["rules"][0]["backendRefs"] == [{"name": "gateway", "port": 80}]
