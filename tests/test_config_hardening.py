"""Configuration edge cases a user hits: hints that leak hidden models, files that are not UTF-8,
reloads that race, and one engine model sold under two licenses.

The HTTP tests run a real gateway with no engines behind it: license decisions and reloads never reach
an engine.
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import httpx
import pytest
import yaml

import gateway.admin as admin
from gateway.policy.decide import Verdict, decide
from gateway.registry import RegistryError, load_registry
from gateway.settings import Settings
from gateway.admission.ratelimit import Limits
from gateway.tenancy.tenants import Environment, Tenant, TenantsError, hash_key, load_tenants
from tests.conftest import LLAMA2_CONDITIONS, ROOT, TINY_VLLM_MODELS
from tests.support.processes import Server, free_port, start_server

BASE = ROOT / "model_registry.yaml"
LOCAL = ROOT / "deploy" / "local" / "registry.yaml"
REGISTRY = load_registry([BASE])

ADMIN_KEY = "sk-test-hardening-admin"
ATTESTED_KEY = "sk-test-hardening-attested"  # production, Llama 2 conditions attested
HIDES_TWIN_KEY = "sk-test-hardening-hides-twin"  # the same, but its deny list hides llama-2-7b
PLAIN_PROD_KEY = "sk-test-hardening-plain-prod"


def _tenant(environment: Environment, attestations: tuple[str, ...] = (), name: str = "t",
            allow: tuple[str, ...] = (), deny: tuple[str, ...] = ()) -> Tenant:
    return Tenant(name=name, environment=environment, allow_models=allow, deny_models=deny,
                  attestations=frozenset(attestations), substitutions=False, admin=False, limits=Limits())


def _write(path: Path, document: dict) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


# 1. The license denial's twin hint names only a twin the tenant may see and call ------------------------


ATTESTED = _tenant(Environment.PRODUCTION, tuple(LLAMA2_CONDITIONS))


def test_the_hint_names_a_twin_the_tenant_can_call() -> None:
    decision = decide(ATTESTED, REGISTRY.models["llama-7b"], REGISTRY)
    assert decision.verdict is Verdict.DENY
    assert "`llama-2-7b` is a commercially usable alternative" in decision.reason


@pytest.mark.parametrize("lists", [{"deny": ("llama-2-*",)}, {"allow": ("llama-7b", "falcon-*")}],
                         ids=["deny-list", "allow-list"])
def test_the_hint_never_names_a_twin_the_tenant_lists_hide(lists: dict) -> None:
    tenant = _tenant(Environment.PRODUCTION, tuple(LLAMA2_CONDITIONS), **lists)
    assert decide(tenant, REGISTRY.models["llama-2-7b"], REGISTRY).hidden  # the twin is a 404 to it
    decision = decide(tenant, REGISTRY.models["llama-7b"], REGISTRY)
    assert decision.verdict is Verdict.DENY and decision.rule == "non-commercial-license-in-production"
    assert "llama-2-7b" not in decision.reason and "alternative" not in decision.reason
    assert "development or research" in decision.reason  # the rest of the explanation stays


def test_the_hint_never_names_a_twin_private_to_other_tenants(tmp_path: Path) -> None:
    overlay = _write(tmp_path / "overlay.yaml", {"models": [{"id": "mpt-7b-instruct", "private_to": ["other"]}]})
    registry = load_registry([BASE, overlay])
    tenant = _tenant(Environment.PRODUCTION, name="mine")
    decision = decide(tenant, registry.models["mpt-7b-chat"], registry)
    assert decision.verdict is Verdict.DENY
    assert "mpt-7b-instruct" not in decision.reason
    owner = _tenant(Environment.PRODUCTION, name="other")  # the tenant it is kept for still gets the hint
    assert "`mpt-7b-instruct` is a commercially usable alternative" in decide(
        owner, registry.models["mpt-7b-chat"], registry).reason


def test_the_hint_never_names_a_twin_the_license_rules_forbid_too() -> None:
    """vicuna-7b-v1.5 is Llama 2 licensed: without the attestations, it would be refused as well."""
    decision = decide(_tenant(Environment.PRODUCTION), REGISTRY.models["vicuna-7b-v1.3"], REGISTRY)
    assert decision.verdict is Verdict.DENY and "vicuna-7b-v1.5" not in decision.reason


# A real gateway without engines: 403s, model lists and reloads need none ----------------------------------


def _tenants_document() -> dict:
    def tenant(name: str, environment: str, key: str, **extra: object) -> dict:
        return {"name": name, "environment": environment, "api_key_hashes": [hash_key(key)], **extra}

    return {"tenants": [
        tenant("ops", "research", ADMIN_KEY, admin=True),
        tenant("prod-attested", "production", ATTESTED_KEY, attestations=LLAMA2_CONDITIONS),
        tenant("prod-hides-twin", "production", HIDES_TWIN_KEY, attestations=LLAMA2_CONDITIONS,
               deny_models=["llama-2-7b"]),
        tenant("prod-plain", "production", PLAIN_PROD_KEY),
    ]}


OVERLAY = {"models": [{"id": "mpt-7b-instruct", "private_to": ["ops"]}]}


@pytest.fixture(scope="module")
def config_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path, Path]]:
    where = tmp_path_factory.mktemp("hardening")
    overlay = _write(where / "overlay.yaml", OVERLAY)
    tenants = _write(where / "tenants.yaml", _tenants_document())
    port = free_port()
    env = {"GATEWAY_REGISTRY": f"{BASE},{overlay}", "GATEWAY_TENANTS": str(tenants),
           "GATEWAY_AUDIT_SINK": str(where / "audit.jsonl"), "GATEWAY_HEALTH_PROBE_INTERVAL_S": "3600"}
    server = start_server("gateway-hardening", [sys.executable, "-m", "gateway", "serve", "--port", str(port)],
                          port, "/ready", where, env)
    try:
        server.wait_ready(60)
        yield server, overlay, tenants
    finally:
        server.stop()


def _denial(server: Server, key: str, model: str) -> str:
    response = httpx.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                          json={"model": model, "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "model_license_forbidden"
    return response.json()["error"]["message"]


def _visible(server: Server, key: str) -> set[str]:
    response = httpx.get(server.url + "/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=30)
    assert response.status_code == 200, response.text
    return {model["id"] for model in response.json()["data"]}


def test_a_403_never_names_a_model_the_tenant_cannot_see(config_gateway: tuple[Server, Path, Path]) -> None:
    server, _, _ = config_gateway
    assert "`llama-2-7b` is a commercially usable alternative" in _denial(server, ATTESTED_KEY, "llama-7b")
    assert "llama-2-7b" not in _visible(server, HIDES_TWIN_KEY)
    assert "`llama-2-7b`" not in _denial(server, HIDES_TWIN_KEY, "llama-7b")
    assert "mpt-7b-instruct" not in _visible(server, PLAIN_PROD_KEY)  # private to 'ops'
    assert "mpt-7b-instruct" not in _denial(server, PLAIN_PROD_KEY, "mpt-7b-chat")


def _reload(server: Server) -> httpx.Response:
    return httpx.post(server.url + "/admin/reload", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)


def _latin1(text: str) -> tuple[bytes, int]:
    """`text` saved as Latin-1, the way an editor set to the wrong encoding saves it, and where its é is."""
    raw = text.encode("latin-1")
    return raw, raw.index(b"\xe9")


def test_reload_of_a_registry_that_is_not_utf8_is_a_400_naming_file_and_offset(
        config_gateway: tuple[Server, Path, Path]) -> None:
    server, overlay, _ = config_gateway
    good = overlay.read_bytes()
    raw, offset = _latin1(yaml.safe_dump(OVERLAY) + "# reviewed by José\n")
    try:
        overlay.write_bytes(raw)
        response = _reload(server)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_configuration"
        assert f"{overlay}: not UTF-8 text: byte 0xe9 at byte offset {offset}" in error["message"]
        assert "mpt-7b-instruct" not in _visible(server, PLAIN_PROD_KEY)  # the running config is kept
    finally:
        overlay.write_bytes(good)
    assert _reload(server).status_code == 200


def test_sighup_with_a_tenants_file_that_is_not_utf8_is_logged(
        config_gateway: tuple[Server, Path, Path]) -> None:
    server, _, tenants = config_gateway
    good = tenants.read_bytes()
    raw, offset = _latin1("# owner: José\n" + good.decode())
    try:
        tenants.write_bytes(raw)
        os.kill(server.process.pid, signal.SIGHUP)
        lines = server.log_lines_with(f"{tenants}: not UTF-8 text", timeout_s=10)
        assert lines, server.log_tail()
        assert "reload refused" in lines[0] and f"byte offset {offset} (line 1)" in lines[0]
        assert "Traceback" not in server.log_text()
        assert _visible(server, ADMIN_KEY)  # still served by the old tenants
    finally:
        tenants.write_bytes(good)
    assert _reload(server).status_code == 200


def test_load_registry_reports_a_non_utf8_file_as_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "overlay.yaml"
    raw, offset = _latin1("models:\n  - id: falcon-7b\n    notes: café\n")
    bad.write_bytes(raw)
    with pytest.raises(RegistryError) as caught:
        load_registry([BASE, bad])
    assert caught.value.problems == [
        f"{bad}: not UTF-8 text: byte 0xe9 at byte offset {offset} (line 3); save the file as UTF-8"]


def test_load_tenants_reports_a_non_utf8_file_as_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "tenants.yaml"
    raw, offset = _latin1("tenants: []  # équipe\n")
    bad.write_bytes(raw)
    with pytest.raises(TenantsError) as caught:
        load_tenants(bad, REGISTRY)
    assert caught.value.problems == [
        f"{bad}: not UTF-8 text: byte 0xe9 at byte offset {offset} (line 1); save the file as UTF-8"]


def test_gateway_check_names_a_non_utf8_registry_or_tenants_file(tmp_path: Path) -> None:
    bad = tmp_path / "registry.yaml"
    bad.write_bytes(BASE.read_bytes() + "# Ü\n".encode("latin-1"))
    result = _cli("check", "--registry", str(bad))
    assert result.returncode == 1
    assert f"{bad}: not UTF-8 text: byte 0xdc at byte offset {len(BASE.read_bytes()) + 2}" in result.stderr
    assert "Traceback" not in result.stderr
    tenants = tmp_path / "tenants.yaml"
    tenants.write_bytes((ROOT / "tenants.example.yaml").read_bytes() + b"# \xff\n")
    result = _cli("check", "--registry", str(BASE), "--tenants", str(tenants))
    assert result.returncode == 1
    assert f"{tenants}: not UTF-8 text: byte 0xff" in result.stderr and "Traceback" not in result.stderr


# 3. Concurrent reloads apply in the order they started ---------------------------------------------------


def test_the_last_reload_started_is_the_one_applied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow reload of the old file must not land after (and over) a faster reload of the newer file."""
    tenants = tmp_path / "tenants.yaml"
    older = _tenants_document()
    older["tenants"] = older["tenants"][:2]
    _write(tenants, older)
    real_load = admin.load_snapshot
    first_read = threading.Event()
    newer_loaded = threading.Event()
    calls = 0

    def load(settings: Settings, client: aiohttp.ClientSession, addresses=None):
        nonlocal calls
        calls += 1
        snapshot = real_load(settings, client, addresses)
        if calls == 1:  # the first reload read the older file, then is slow (a big registry, a busy host)
            first_read.set()
            newer_loaded.wait(timeout=1.0)
        else:
            newer_loaded.set()
        return snapshot

    monkeypatch.setattr(admin, "load_snapshot", load)
    monkeypatch.setattr(admin, "settle_garbage_collector", lambda: None)  # leave pytest's own collector be

    async def scenario() -> tuple[int, list[bool]]:
        async with aiohttp.ClientSession() as client:
            settings = Settings(registry=str(BASE), tenants=tenants)
            state = SimpleNamespace(settings=settings, client=client, snapshot=real_load(settings, client))
            first = asyncio.create_task(admin.reload_config(state))
            await asyncio.to_thread(first_read.wait, 10)
            _write(tenants, _tenants_document())  # the operator edits again and reloads again
            second = asyncio.create_task(admin.reload_config(state))
            results = await asyncio.gather(first, second)
            return len(state.snapshot.tenants.tenants), [result.ok for result in results]

    served, oks = asyncio.run(scenario())
    assert oks == [True, True]
    assert served == 4  # the newer file's tenants, not the older file's 2


# 4. One engine model under two licenses -------------------------------------------------------------------


def _backend(backend_id: str, url: str, served: str | None, **extra: object) -> dict:
    backend = {"id": backend_id, "engine": "vllm", "engine_version": "0.32.0", "url": url, "role": "primary"}
    return backend | ({"served_model_name": served} if served else {}) | extra


def test_two_licenses_on_one_engine_model_are_rejected(tmp_path: Path) -> None:
    """alpaca-7b is CC BY-NC 4.0: served as llama-2-7b, non-commercial weights would pass as Llama 2's."""
    shared = "http://127.0.0.1:9000"
    problems = _problems_of(tmp_path, {"models": [
        {"id": "llama-2-7b", "backends": [_backend("b-llama2", shared, "shared-llama")]},
        {"id": "alpaca-7b", "backends": [_backend("b-alpaca", shared + "/", "shared-llama")]},
    ]})
    assert len(problems) == 1, problems
    [problem] = problems
    overlay = tmp_path / "overlay.yaml"
    assert problem.startswith(f"{overlay}: model 'alpaca-7b': field 'backends.0.url'")
    assert "model 'llama-2-7b'" in problem and "backends.0" in problem
    assert "'shared-llama'" in problem and "cc-by-nc-4.0" in problem and "llama2" in problem


def test_a_backend_shared_with_a_model_of_another_file_names_both_files(tmp_path: Path) -> None:
    """The served name defaults to the model id, so the clash shows with no served_model_name at all."""
    url = yaml.safe_load(BASE.read_text())["models"][0]["backends"][0]["url"]
    problems = _problems_of(tmp_path, {"models": [
        {"id": "llama-2-7b", "backends": [_backend("b-llama2", url, "llama-7b")]}]})
    assert len(problems) == 1, problems
    assert f"{tmp_path / 'overlay.yaml'}: model 'llama-2-7b': field 'backends.0.url'" in problems[0]
    assert f"model 'llama-7b' ({BASE}" in problems[0]


def _problems_of(tmp_path: Path, document: dict) -> list[str]:
    overlay = _write(tmp_path / "overlay.yaml", document)
    with pytest.raises(RegistryError) as caught:
        load_registry([BASE, overlay])
    return caught.value.problems


def test_same_license_may_share_a_backend(tmp_path: Path) -> None:
    shared = "http://127.0.0.1:9000"
    overlay = _write(tmp_path / "overlay.yaml", {"models": [
        {"id": "falcon-7b", "backends": [_backend("b-falcon", shared, "falcon")]},
        {"id": "falcon-7b-instruct", "backends": [_backend("b-falcon-alias", shared, "falcon")]},
    ]})
    registry = load_registry([BASE, overlay])
    assert registry.models["falcon-7b-instruct"].backends[0].base_url == shared


def test_the_opt_out_must_be_set_on_every_shared_backend(tmp_path: Path) -> None:
    shared = "http://127.0.0.1:9000"
    one_side = {"models": [
        {"id": "llama-2-7b", "backends": [_backend("b-llama2", shared, "tiny", shared_with_other_licenses=True)]},
        {"id": "alpaca-7b", "backends": [_backend("b-alpaca", shared, "tiny")]},
    ]}
    [problem] = _problems_of(tmp_path, one_side)
    assert "model 'alpaca-7b': field 'backends.0.url'" in problem
    both = copy.deepcopy(one_side)
    both["models"][1]["backends"][0]["shared_with_other_licenses"] = True
    load_registry([BASE, _write(tmp_path / "overlay.yaml", both)])


def _conftest_like_overlay(opt_out: bool) -> dict:
    """The shape of tests/conftest.py's overlay: each tiny vLLM checkpoint stands in for several ids."""
    models = []
    for port, (name, (version, model_ids)) in enumerate(TINY_VLLM_MODELS.items(), start=9100):
        for model_id in model_ids:
            backend = {"id": f"test-{name}-for-{model_id}", "engine": "vllm", "engine_version": version,
                       "url": f"http://127.0.0.1:{port}", "role": "primary", "served_model_name": name}
            if opt_out:
                backend["shared_with_other_licenses"] = True
            models.append({"id": model_id, "backends": [backend]})
    return {"models": models}


def test_the_test_fixture_overlay_needs_the_opt_out(tmp_path: Path) -> None:
    problems = _problems_of(tmp_path, _conftest_like_overlay(opt_out=False))
    assert any("model 'vicuna-7b-v1.3'" in p and "'tiny-llama'" in p for p in problems), problems
    assert any("model 'mpt-7b-chat'" in p and "'tiny-mpt'" in p for p in problems), problems
    load_registry([BASE, _write(tmp_path / "overlay.yaml", _conftest_like_overlay(opt_out=True))])


def test_gateway_check_passes_the_shipped_registry_and_local_overlay() -> None:
    result = _cli("check", "--registry", str(BASE), "--registry", str(LOCAL),
                  "--tenants", str(ROOT / "deploy/local/tenants.yaml"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok: 51 models, 9 licenses, 2 tenants"


def test_gateway_check_rejects_two_licenses_on_one_engine_model(tmp_path: Path) -> None:
    overlay = _write(tmp_path / "overlay.yaml", {"models": [
        {"id": "llama-2-7b", "backends": [_backend("b-llama2", "http://127.0.0.1:9000", "tiny")]},
        {"id": "alpaca-7b", "backends": [_backend("b-alpaca", "http://127.0.0.1:9000", "tiny")]},
    ]})
    result = _cli("check", "--registry", str(BASE), "--registry", str(overlay))
    assert result.returncode == 1
    assert f"{overlay}: model 'alpaca-7b': field 'backends.0.url'" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_e2e_fixture_overlay_of_conftest_loads(tmp_path: Path) -> None:
    """tests/conftest.py's real overlay (the `gateway` fixture's registry): it must opt out explicitly."""
    from tests.conftest import _overlay

    def server(port: int) -> SimpleNamespace:
        return SimpleNamespace(url=f"http://127.0.0.1:{port}")

    fleet = {name: server(9100 + i) for i, name in enumerate(TINY_VLLM_MODELS)}
    overlay = _write(tmp_path / "test-overlay.yaml", _overlay(server(9090), fleet, server(9099)))
    registry = load_registry([BASE, overlay])
    assert registry.models["vicuna-7b-v1.3"].backends[0].served_model_name == "tiny-llama"
