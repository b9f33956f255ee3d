"""The admin views the console reads (gateway/api/admin_views.py), against a real gateway process:
the policy matrix is `gateway policy explain`, cell for cell; a tenant key sees its own tenant and never
a model hidden from it; pages are bounded and walk every row once; parameters are strict."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.registry import load_registry
from gateway.tenancy.tenants import hash_key, load_tenants
from tests.conftest import ROOT, tenants_document
from tests.support.console import explain
from tests.support.processes import Server, free_port, start_server

ADMIN, PROD, SUBST, NARROW = "sk-test-any-key", "sk-test-prod-key", "sk-test-subst-key", "sk-test-narrow-key"


def _tenants() -> dict:
    document = tenants_document()
    document["tenants"].append({"name": "narrow-dev", "environment": "development",
                                "api_key_hashes": [hash_key(NARROW)], "allow_models": ["falcon-*"],
                                "limits": {"tokens_per_day": 5000}})
    return document


def _start(name: str, log_dir: Path, work: Path, env: dict[str, str] | None = None) -> Server:
    port = free_port()
    server = start_server(name, [sys.executable, "-m", "gateway", "serve", "--port", str(port)], port, "/ready",
                          log_dir, {"GATEWAY_REGISTRY": str(ROOT / "model_registry.yaml"),
                                    "GATEWAY_TENANTS": str(work / "tenants.yaml"),
                                    "GATEWAY_AUDIT_SINK": str(work / "audit.jsonl"),
                                    "GATEWAY_DATA_DIR": str(work / f"data-{name}"), **(env or {})})
    server.wait_ready(60)
    return server


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("admin-views")
    (path / "tenants.yaml").write_text(yaml.safe_dump(_tenants()))
    return path


@pytest.fixture(scope="module")
def gateway(log_dir: Path, work: Path) -> Iterator[Server]:
    server = _start("admin-views-gateway", log_dir, work)
    try:
        yield server
    finally:
        server.stop()


def _get(gateway: Server, path: str, key: str, **params) -> httpx.Response:
    return httpx.get(gateway.url + path, params=params, headers={"authorization": f"Bearer {key}"}, timeout=30)


def test_the_policy_matrix_is_policy_explain_for_every_cell(gateway: Server, work: Path) -> None:
    registry = load_registry([ROOT / "model_registry.yaml"])
    tenants = load_tenants(work / "tenants.yaml", registry)
    body = _get(gateway, "/admin/policy", ADMIN, limit=100).json()
    assert [t["name"] for t in body["tenants"]] == sorted(tenants.tenants)
    cells = {(c["tenant"], c["model"]): c for c in body["data"]}
    assert len(cells) == len(tenants.tenants) * len(registry.models)  # an admin sees hidden cells too
    for tenant in tenants.tenants:
        for model in registry.models:
            cell, said = cells[(tenant, model)], explain(registry, tenants, tenant, model)
            assert (cell["verdict"], cell["rule"], cell["reason"], cell["hidden"]) == \
                   (said["verdict"], said["rule"], said["reason"], said["hidden"]), (tenant, model)
            if said["served"]:
                assert cell["served_model"] == said["served"]
            assert cell["status"] == (404 if said["hidden"] else 403 if said["verdict"] == "deny" else 200)


def test_policy_cells_say_which_conditions_are_attested_and_which_missing(gateway: Server) -> None:
    body = _get(gateway, "/admin/policy", ADMIN, tenant="prod-app,prod-subst", model="llama-2-7b-chat").json()
    cells = {c["tenant"]: c for c in body["data"]}
    assert cells["prod-app"]["verdict"] == "deny" and cells["prod-app"]["rule"] == "conditional-license-unattested"
    assert cells["prod-app"]["conditions"] and not any(c["attested"] for c in cells["prod-app"]["conditions"])
    assert cells["prod-subst"]["verdict"] == "allow"
    assert all(c["attested"] for c in cells["prod-subst"]["conditions"])


def test_a_tenant_key_sees_its_own_tenant_only(gateway: Server) -> None:
    own = _get(gateway, "/admin/policy", PROD).json()
    assert [t["name"] for t in own["tenants"]] == ["prod-app"]
    assert {c["tenant"] for c in own["data"]} == {"prod-app"}
    for path in ("/admin/policy", "/admin/tenants"):
        refused = _get(gateway, path, PROD, tenant="prod-subst")
        assert refused.status_code == 403, path
        assert refused.json()["error"]["code"] == "forbidden_tenant"
    tenants = _get(gateway, "/admin/tenants", PROD).json()["data"]
    assert [t["name"] for t in tenants] == ["prod-app"]


def test_a_tenant_never_sees_a_model_hidden_from_it(gateway: Server) -> None:
    models = _get(gateway, "/admin/models", NARROW).json()
    assert models["data"] and all(m["id"].startswith("falcon-") for m in models["data"])
    assert models["families"] == ["falcon"]
    cells = _get(gateway, "/admin/policy", NARROW).json()["data"]
    assert cells and all(c["model"].startswith("falcon-") and not c["hidden"] for c in cells)
    # ... while an admin sees the same tenant's other models as hidden, by its allow list
    admin = _get(gateway, "/admin/policy", ADMIN, tenant="narrow-dev", model="llama-7b").json()["data"]
    assert admin[0]["hidden"] and admin[0]["rule"] == "tenant-allow-list"


def test_models_carry_license_hardware_and_backends_with_urls_for_admins_only(gateway: Server) -> None:
    admin = {m["id"]: m for m in _get(gateway, "/admin/models", ADMIN).json()["data"]}
    tenant = {m["id"]: m for m in _get(gateway, "/admin/models", PROD).json()["data"]}
    chat = admin["llama-2-7b-chat"]
    assert chat["commercial_use"] == "conditional" and chat["conditions"] and chat["context_length"] == 4096
    assert chat["prompt_format"] == "llama-2-chat" and chat["hardware"]["min_gpu"]
    assert chat["backends"] and all("url" in b for b in chat["backends"]) and chat["decision"] is None
    assert all("url" not in b for b in tenant["llama-2-7b-chat"]["backends"])
    assert tenant["llama-2-7b-chat"]["decision"]["verdict"] == "deny"  # a 403 it would get anyway: shown


def test_models_filter_and_search(gateway: Server) -> None:
    conditional = _get(gateway, "/admin/models", ADMIN, commercial_use="conditional").json()["data"]
    assert conditional and {m["commercial_use"] for m in conditional} == {"conditional"}
    falcon = _get(gateway, "/admin/models", ADMIN, family="falcon").json()["data"]
    assert falcon and {m["family"] for m in falcon} == {"falcon"}
    found = _get(gateway, "/admin/models", ADMIN, q="BELUGA").json()["data"]
    assert found and all("beluga" in (m["id"] + m["family"] + m["hf_repo"]).lower() for m in found)


def test_pages_walk_every_tenant_once(gateway: Server) -> None:
    names, after = [], None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        body = _get(gateway, "/admin/tenants", ADMIN, **params).json()
        assert len(body["data"]) <= 2
        names += [t["name"] for t in body["data"]]
        if not body["has_more"]:
            break
        after = body["last_id"]
    assert names == sorted(t["name"] for t in _tenants()["tenants"])


@pytest.mark.parametrize("params, status, param", [
    ({"limit": "0"}, 400, "limit"), ({"limit": "101"}, 400, "limit"), ({"limit": "٣"}, 400, "limit"),
    ({"after": "no-such-tenant"}, 400, "after"), ({"colour": "red"}, 400, "colour"),
    ({"tenant": "no-such-tenant"}, 404, "tenant"),
])
def test_parameters_are_strict(gateway: Server, params: dict, status: int, param: str) -> None:
    response = _get(gateway, "/admin/tenants", ADMIN, **params)
    assert response.status_code == status
    assert response.json()["error"]["param"] == param


def test_me_names_the_key_and_needs_one(gateway: Server) -> None:
    me = _get(gateway, "/admin/me", SUBST).json()
    assert me == {"object": "caller", "tenant": "prod-subst", "key_id": hash_key(SUBST)[7:15], "admin": False,
                  "environment": "production"}
    assert httpx.get(gateway.url + "/admin/me").status_code == 401
    assert _get(gateway, "/admin/me", "sk-wrong").status_code == 401


def test_tenants_show_limits_attestations_and_quota_left(gateway: Server) -> None:
    narrow = _get(gateway, "/admin/tenants", ADMIN, tenant="narrow-dev").json()["data"][0]
    assert narrow["limits"]["tokens_per_day"] == 5000
    assert narrow["quotas"]["tokens_per_day"]["limit"] == 5000
    assert narrow["quotas"]["tokens_per_day"]["used"] + narrow["quotas"]["tokens_per_day"]["remaining"] == 5000
    subst = _get(gateway, "/admin/tenants", ADMIN, tenant="prod-subst").json()["data"][0]
    llama2 = [c for c in subst["conditions"] if c["license"] == "llama2"]
    assert llama2 and all(c["attested"] for c in llama2)
    assert any(not c["attested"] for c in subst["conditions"] if c["license"] != "llama2")


def test_the_console_can_be_switched_off(log_dir: Path, work: Path) -> None:
    server = _start("console-off-gateway", log_dir, work, {"GATEWAY_CONSOLE": "false"})
    try:
        assert httpx.get(server.url + "/console/sign-in").status_code == 404
        assert _get(server, "/admin/me", ADMIN).status_code == 200  # the API is still there
    finally:
        server.stop()
