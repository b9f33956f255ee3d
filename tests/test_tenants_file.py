"""A bad tenants file stops start-up with one message naming the file, the tenant and the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.registry import load_registry
from gateway.tenancy.tenants import TenantsError, hash_key, load_tenants
from tests.conftest import ROOT, tenants_document

REGISTRY = load_registry([ROOT / "model_registry.yaml"])


def _problems(tmp_path: Path, document: dict) -> list[str]:
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(TenantsError) as caught:
        load_tenants(path, REGISTRY)
    assert all(str(path) in problem for problem in caught.value.problems)
    return caught.value.problems


def test_the_test_tenants_and_the_shipped_examples_load(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump(tenants_document()))
    directory = load_tenants(path, REGISTRY)
    assert set(directory.tenants) == {"research-lab", "prod-app", "prod-subst", "limited-dev", "extras-lab",
                                       "grammar-lab", "metered-lab"}
    assert directory.tenants["extras-lab"].engine_extras == {"prompt_logprobs"}
    assert len(load_tenants(ROOT / "tenants.example.yaml", REGISTRY).tenants) == 3
    assert len(load_tenants(ROOT / "deploy/local/tenants.yaml", REGISTRY).tenants) == 2


def test_unknown_environment(tmp_path: Path) -> None:
    document = tenants_document()
    document["tenants"][1]["environment"] = "prod"
    [problem] = _problems(tmp_path, document)
    assert "tenant 'prod-app': field 'environment'" in problem and "production" in problem


def test_duplicate_key_hash(tmp_path: Path) -> None:
    document = tenants_document()
    document["tenants"][2]["api_key_hashes"] = list(document["tenants"][1]["api_key_hashes"])
    [problem] = _problems(tmp_path, document)
    assert "tenant 'prod-subst': field 'api_key_hashes.0': duplicate key hash" in problem
    assert "prod-app" in problem


def test_unknown_model_in_allow_list(tmp_path: Path) -> None:
    document = tenants_document()
    document["tenants"][0]["allow_models"] = ["flan-t5-*", "gpt-4*"]
    [problem] = _problems(tmp_path, document)
    assert "tenant 'research-lab': field 'allow_models.1': 'gpt-4*' matches no registry model" in problem


def test_unknown_attestation_and_raw_key_instead_of_hash(tmp_path: Path) -> None:
    document = tenants_document()
    document["tenants"][1]["attestations"] = ["llama2-under-7m-mau"]
    document["tenants"][3]["api_key_hashes"] = ["sk-plain-key-by-mistake"]
    problems = _problems(tmp_path, document)
    assert any("tenant 'prod-app': field 'attestations.0'" in p for p in problems)
    assert any("tenant 'limited-dev': field 'api_key_hashes.0': not a 'sha256:<64 hex>' hash" in p
               for p in problems)
    assert not any("sk-plain-key-by-mistake" in p for p in problems)  # never print what may be a key


def test_key_hash_with_a_trailing_newline_is_refused_at_load(tmp_path: Path) -> None:
    """YAML's `- |` block keeps the line break: `^...$` matched such a hash, which then never matched a key."""
    key_hash = hash_key("sk-test-newline-key")
    path = tmp_path / "tenants.yaml"
    path.write_text("tenants:\n  - name: newline-team\n    environment: research\n    api_key_hashes:\n"
                    f"      - |\n        {key_hash}\n")
    assert yaml.safe_load(path.read_text())["tenants"][0]["api_key_hashes"] == [key_hash + "\n"]
    with pytest.raises(TenantsError) as caught:
        load_tenants(path, REGISTRY)
    assert caught.value.problems == [
        f"{path}: tenant 'newline-team': field 'api_key_hashes.0': has whitespace or a line break around it "
        "(YAML's `- |` keeps one; write the hash as a plain value)"]
    path.write_text(path.read_text().replace("- |\n        ", "- "))  # the same hash as a plain value
    assert load_tenants(path, REGISTRY).caller_for_key("sk-test-newline-key").tenant.name == "newline-team"


def test_gateway_refuses_to_start_with_a_bad_tenants_file(tmp_path: Path) -> None:
    document = tenants_document()
    document["tenants"][0]["environment"] = "qa"
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump(document))
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", "1"], capture_output=True,
                            text=True, cwd=ROOT, timeout=60,
                            env={"GATEWAY_TENANTS": str(path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert f"{path}: tenant 'research-lab': field 'environment'" in result.stderr
    assert "Traceback" not in result.stderr


def test_keys_new_prints_a_key_and_its_hash() -> None:
    result = subprocess.run([sys.executable, "-m", "gateway", "keys", "new", "--tenant", "team-a"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    lines = [line.strip() for line in result.stdout.splitlines()]
    key = next(line for line in lines if line.startswith("sk-gw-"))
    assert len(key) > 40
    assert f'- "{hash_key(key)}"' in lines


def test_policy_explain_uses_the_same_decision(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "gateway", "policy", "explain", "--tenants",
                             str(ROOT / "deploy/local/tenants.yaml"), "--tenant", "local-prod", "--model",
                             "alpaca-7b"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0
    assert result.stdout.startswith("deny (non-commercial-license-in-production): `alpaca-7b`")


def test_unknown_engine_extra_names_the_field(tmp_path: Path) -> None:
    document = tenants_document()
    document["tenants"][1]["engine_extras"] = ["priority", "top_secret_knob"]
    problems = _problems(tmp_path, document)
    assert any("tenant 'prod-app': field 'engine_extras'" in p and "top_secret_knob" in p for p in problems)
