"""A bad registry stops start-up with one message naming the file, the entry and the field."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.registry import RegistryError, load_registry

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "model_registry.yaml"
LOCAL = ROOT / "deploy" / "local" / "registry.yaml"


def _local_entry() -> dict:
    return copy.deepcopy(yaml.safe_load(LOCAL.read_text())["models"][0])


def _problems(tmp_path: Path, document: dict) -> list[str]:
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(RegistryError) as caught:
        load_registry([BASE, path])
    return caught.value.problems


def _only_problem(tmp_path: Path, document: dict) -> str:
    problems = _problems(tmp_path, document)
    assert len(problems) == 1, problems
    assert str(tmp_path / "overlay.yaml") in problems[0]
    return problems[0]


def test_the_shipped_registry_and_local_overlay_are_valid() -> None:
    registry = load_registry([BASE, LOCAL])
    assert len(registry.models) == 51
    assert registry.model("smollm2-135m-instruct").backends[0].served_model_name == "smollm2-local"


def test_unknown_license_key_names_entry_and_field(tmp_path: Path) -> None:
    entry = _local_entry() | {"license": "apache-20"}
    message = _only_problem(tmp_path, {"models": [entry]})
    assert "model 'smollm2-135m-instruct'" in message
    assert "field 'license'" in message and "'apache-20'" in message


def test_duplicate_id_in_one_file(tmp_path: Path) -> None:
    entry = _local_entry()
    message = _only_problem(tmp_path, {"models": [entry, entry]})
    assert "model 'smollm2-135m-instruct': field 'id': duplicate id" in message


def test_missing_field(tmp_path: Path) -> None:
    entry = _local_entry()
    del entry["context_length"]
    message = _only_problem(tmp_path, {"models": [entry]})
    assert "model 'smollm2-135m-instruct': field 'context_length': missing" in message


def test_bad_backend_url(tmp_path: Path) -> None:
    entry = _local_entry()
    entry["backends"][0]["url"] = "not a url"
    message = _only_problem(tmp_path, {"models": [entry]})
    assert "model 'smollm2-135m-instruct': field 'backends.0.url'" in message


def test_unknown_prompt_format(tmp_path: Path) -> None:
    entry = _local_entry() | {"prompt_format": "vicuna-v9"}
    message = _only_problem(tmp_path, {"models": [entry]})
    assert "field 'prompt_format'" in message and "'vicuna-v9'" in message


def test_mpt_on_a_vllm_that_dropped_it_is_rejected(tmp_path: Path) -> None:
    backend = {"id": "mpt-on-new-vllm", "engine": "vllm", "engine_version": "0.32.0",
               "url": "http://127.0.0.1:9000", "role": "primary"}
    message = _only_problem(tmp_path, {"models": [{"id": "mpt-7b", "backends": [backend]}]})
    assert "model 'mpt-7b': field 'backends.0.engine_version'" in message
    assert "vllm 0.32.0 cannot serve MPTForCausalLM (needs vllm<0.28)" in message


def test_t5_on_vllm_is_rejected_at_any_version(tmp_path: Path) -> None:
    backend = {"id": "t5-on-vllm", "engine": "vllm", "engine_version": "0.6.0",
               "url": "http://127.0.0.1:9000", "role": "primary"}
    message = _only_problem(tmp_path, {"models": [{"id": "flan-t5-small", "backends": [backend]}]})
    assert "vllm cannot serve T5ForConditionalGeneration at any version" in message


def test_declaring_mpt_for_every_vllm_version_is_rejected(tmp_path: Path) -> None:
    engines = [{"engine": "vllm", "versions": ""}, {"engine": "llama.cpp", "versions": ""}]
    message = _only_problem(tmp_path, {"models": [{"id": "mpt-7b", "engines": engines}]})
    assert "model 'mpt-7b': field 'engines.0.versions'" in message and "<0.28" in message


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    entry = _local_entry() | {"license": "nope", "prompt_format": "nope"}
    assert len(_problems(tmp_path, {"models": [entry]})) == 2


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_gateway_check_exits_1_naming_a_misspelt_license(tmp_path: Path) -> None:
    bad = tmp_path / "registry.yaml"
    bad.write_text(BASE.read_text().replace("license: apache-2.0", "license: apache2", 1))
    result = _cli("check", "--registry", str(bad))
    assert result.returncode == 1
    assert f"{bad}: model '" in result.stderr
    assert "field 'license': unknown license key 'apache2'" in result.stderr
    assert "Traceback" not in result.stderr


def test_gateway_check_exits_0_on_the_shipped_registry() -> None:
    result = _cli("check", "--registry", str(BASE))
    assert result.returncode == 0, result.stderr
    assert "50 models" in result.stdout


def test_gateway_models_prints_the_table() -> None:
    result = _cli("models", "--registry", str(BASE))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["id", "family", "params", "context", "license", "commercial", "min",
                                "GPU", "backends"]
    falcon = next(line for line in lines if line.startswith("falcon-180b "))
    assert "conditional" in falcon and "8x A100-80GB" in falcon and "178.6B" in falcon
    assert len(lines) == 51


def test_serving_with_a_bad_registry_fails_at_start_up(tmp_path: Path) -> None:
    bad = tmp_path / "registry.yaml"
    bad.write_text(BASE.read_text().replace('prompt_format: "alpaca"', 'prompt_format: "alpaka"', 1))
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", "1"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60,
                            env={"GATEWAY_REGISTRY": str(bad), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert "model 'alpaca-7b': field 'prompt_format'" in result.stderr
