"""The deployed view of the registry (GATEWAY_DEPLOYED, gateway/registry/deployed.py), on the overlays'
own generated files: what a gateway in that overlay lists, decides and substitutes.

Why (issue 22): the gateway mounted the whole registry: a production key's /v1/models listed 20 models
of which most could not answer, a call to an undeployed model was a 503, and substitution could point
at an undeployed twin."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.api.models import visible_models
from gateway.policy.decide import Verdict, decide
from gateway.registry import RegistryError, deployed_view, load_registry, read_deployed
from gateway.settings import Settings
from gateway.snapshot import load_config
from gateway.admission.ratelimit import Limits
from gateway.tenancy.tenants import Environment, Tenant
from tests.support.deploy import ROOT

PROD = ROOT / "deploy/overlays/prod/models/deployed.yaml"
FULL = load_registry([ROOT / "model_registry.yaml"])


def _tenant(substitutions: bool = False, attestations: tuple[str, ...] = (), deny: tuple[str, ...] = ()) -> Tenant:
    return Tenant(name="acme", environment=Environment.PRODUCTION, allow_models=(), deny_models=deny,
                  attestations=frozenset(attestations), substitutions=substitutions, admin=False, limits=Limits())


def _prod_view():
    return deployed_view(FULL, read_deployed(PROD, FULL))


def test_a_production_key_lists_only_models_the_overlay_runs() -> None:
    view = _prod_view()
    deployed = set(yaml.safe_load(PROD.read_text())["backends"])
    listed = {m.id for m in visible_models(view, _tenant())}
    assert listed and len(listed) < len({m.id for m in visible_models(FULL, _tenant())})
    for model_id in listed:
        assert {b.id for b in view.models[model_id].backends} <= deployed
    assert {b.id for m in view.models.values() for b in m.backends} == deployed  # nothing else is probed
    assert all(b.discovery == "dns" for m in view.models.values() for b in m.backends)


def test_substitution_never_points_at_an_undeployed_twin(tmp_path: Path) -> None:
    """alpaca-7b's twin is llama-2-7b-chat: substituted where the overlay runs the twin, not elsewhere."""
    tenant = _tenant(substitutions=True, attestations=("llama2-under-700m-mau", "llama2-no-improving-other-llms",
                                                       "llama2-acceptable-use-policy"))
    twin = FULL.models["alpaca-7b"].commercial_twin
    assert twin == "llama-2-7b-chat"
    with_twin = deployed_view(FULL, read_deployed(PROD, FULL))
    assert decide(tenant, FULL.models["alpaca-7b"], with_twin).verdict is Verdict.SUBSTITUTE
    without = tmp_path / "deployed.yaml"
    without.write_text(yaml.safe_dump({"overlay": "x", "backends": ["vllm-alpaca-7b-0", "vllm-falcon-7b-instruct-0"]}))
    view = deployed_view(FULL, read_deployed(without, FULL))
    decision = decide(tenant, view.models["alpaca-7b"], view)
    assert decision.verdict is Verdict.DENY and twin not in decision.reason  # not even suggested
    assert twin in view.undeployed


def test_an_undeployed_model_is_a_404_that_says_so_unless_the_tenant_may_not_know_it(tmp_path: Path) -> None:
    settings = Settings.model_construct(registry=str(ROOT / "model_registry.yaml"), deployed=PROD, tenants=None)
    registry, _ = load_config(settings)
    from gateway.snapshot import Snapshot

    snapshot = Snapshot(registry, None, upstreams=None)
    assert "alpaca-7b" in registry.undeployed and registry.model("alpaca-7b") is None
    error = snapshot.missing("alpaca-7b", _tenant())
    assert error.status == 404 and error.code == "model_not_found" and "not deployed here" in error.message
    hidden = snapshot.missing("alpaca-7b", _tenant(deny=("alpaca-*",)))
    assert hidden.status == 404 and "not deployed" not in hidden.message  # its lists hide it: a plain 404
    assert "not deployed" not in snapshot.missing("no-such-model", _tenant()).message


def test_a_deployed_file_naming_an_unknown_backend_is_refused_with_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "deployed.yaml"
    bad.write_text(yaml.safe_dump({"backends": ["vllm-llama-2-7b-chat-0", "vllm-nope-0"], "extra": 1}))
    with pytest.raises(RegistryError) as error:
        read_deployed(bad, FULL)
    assert str(bad) in str(error.value) and "extra" in str(error.value)
    bad.write_text(yaml.safe_dump({"backends": ["vllm-llama-2-7b-chat-0", "vllm-nope-0"]}))
    with pytest.raises(RegistryError) as error:
        read_deployed(bad, FULL)
    assert f"{bad}: field 'backends.1': 'vllm-nope-0'" in str(error.value)
