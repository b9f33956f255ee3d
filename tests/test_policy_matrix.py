"""Every registry variant x every environment, with and without attestations: allow, deny or substitute.

The truth is the commercial-use column of the hand-written reference table (tests/test_registry_reference.py,
from docs/reference/models.md) and the license conditions named there, not the engine's code.
"""

from __future__ import annotations

import pathlib

import pytest

from gateway.policy.decide import Verdict, decide
from gateway.registry import load_registry
from gateway.admission.ratelimit import Limits
from gateway.tenancy.tenants import Environment, Tenant
from tests.test_registry_reference import REFERENCE

REGISTRY = load_registry([pathlib.Path(__file__).resolve().parents[1] / "model_registry.yaml"])
# The conditions each conditional license sets (models.md: Llama 2 §1.b.v, §2, AUP; Falcon-180B: no
# hosting use without TII's separate license, plus its Acceptable Use Policy).
CONDITIONS = {
    "llama2": {"llama2-under-700m-mau", "llama2-no-improving-other-llms", "llama2-acceptable-use-policy"},
    "falcon-180b-tii-license-1.0": {"falcon-180b-hosting-license", "falcon-180b-acceptable-use-policy"},
}
ALL_ATTESTATIONS = frozenset().union(*CONDITIONS.values())
PRODUCTION_LIKE = {Environment.PRODUCTION, Environment.STAGING}


def tenant(environment: Environment, attestations: frozenset[str] = frozenset(),
           substitutions: bool = False, **lists: tuple[str, ...]) -> Tenant:
    return Tenant(name=f"t-{environment.value}", environment=environment,
                  allow_models=lists.get("allow", ()), deny_models=lists.get("deny", ()),
                  attestations=attestations, substitutions=substitutions, admin=False, limits=Limits())


def expected(model_id: str, environment: Environment, attested: bool) -> Verdict:
    license_key, commercial, _, _ = REFERENCE[model_id]
    if commercial == "yes" or environment not in PRODUCTION_LIKE:
        return Verdict.ALLOW
    if commercial == "conditional" and attested:
        return Verdict.ALLOW
    return Verdict.DENY


CASES = [(m, env, attested) for m in sorted(REFERENCE) for env in Environment for attested in (False, True)]


@pytest.mark.parametrize(("model_id", "environment", "attested"), CASES,
                         ids=[f"{m}-{e.value}-{'attested' if a else 'plain'}" for m, e, a in CASES])
def test_decision_for_every_variant_and_environment(model_id: str, environment: Environment,
                                                    attested: bool) -> None:
    decision = decide(tenant(environment, ALL_ATTESTATIONS if attested else frozenset()),
                      REGISTRY.models[model_id], REGISTRY)
    assert decision.verdict is expected(model_id, environment, attested), decision
    if decision.verdict is Verdict.DENY:
        assert model_id in decision.reason and environment.value in decision.reason
        assert REFERENCE[model_id][0] in decision.reason  # names the license
        assert "development or research" in decision.reason  # says what would permit it


def test_conditional_license_needs_every_condition() -> None:
    partial = frozenset({"llama2-under-700m-mau"})
    decision = decide(tenant(Environment.PRODUCTION, partial), REGISTRY.models["llama-2-7b-chat"], REGISTRY)
    assert decision.verdict is Verdict.DENY and decision.rule == "conditional-license-unattested"
    assert "llama2-no-improving-other-llms" in decision.reason
    assert "llama2-under-700m-mau" not in decision.reason.split("not attested:")[1]


def test_falcon_180b_hosting_is_a_condition_like_any_other() -> None:
    llama_only = frozenset(CONDITIONS["llama2"])
    model = REGISTRY.models["falcon-180b-chat"]
    assert decide(tenant(Environment.STAGING, llama_only), model, REGISTRY).verdict is Verdict.DENY
    attested = decide(tenant(Environment.STAGING, frozenset(CONDITIONS["falcon-180b-tii-license-1.0"])), model,
                      REGISTRY)
    assert attested.verdict is Verdict.ALLOW and attested.rule == "conditional-license-attested"


def test_substitution_to_the_commercial_twin() -> None:
    opted_in = tenant(Environment.PRODUCTION, ALL_ATTESTATIONS, substitutions=True)
    decision = decide(opted_in, REGISTRY.models["vicuna-13b-v1.3"], REGISTRY)
    assert (decision.verdict, decision.served_model) == (Verdict.SUBSTITUTE, "vicuna-13b-v1.5")
    decision = decide(opted_in, REGISTRY.models["mpt-7b-chat"], REGISTRY)
    assert (decision.verdict, decision.served_model) == (Verdict.SUBSTITUTE, "mpt-7b-instruct")


def test_substitution_needs_the_opt_in() -> None:
    decision = decide(tenant(Environment.PRODUCTION, ALL_ATTESTATIONS), REGISTRY.models["vicuna-13b-v1.3"], REGISTRY)
    assert decision.verdict is Verdict.DENY and "vicuna-13b-v1.5" in decision.reason


def test_substitution_never_chains_into_a_forbidden_model() -> None:
    """vicuna-13b-v1.5 is Llama 2 licensed: without the Llama 2 attestations the twin is forbidden too."""
    opted_in = tenant(Environment.PRODUCTION, substitutions=True)
    decision = decide(opted_in, REGISTRY.models["vicuna-13b-v1.3"], REGISTRY)
    assert decision.verdict is Verdict.DENY and decision.rule == "non-commercial-license-in-production"


def test_deny_and_allow_lists_hide_models() -> None:
    research = tenant(Environment.RESEARCH, deny=("falcon-*",))
    decision = decide(research, REGISTRY.models["falcon-7b"], REGISTRY)
    assert (decision.verdict, decision.rule, decision.hidden) == (Verdict.DENY, "tenant-deny-list", True)
    only_t5 = tenant(Environment.RESEARCH, allow=("flan-t5-*",))
    assert decide(only_t5, REGISTRY.models["flan-t5-xl"], REGISTRY).verdict is Verdict.ALLOW
    decision = decide(only_t5, REGISTRY.models["llama-7b"], REGISTRY)
    assert (decision.verdict, decision.rule) == (Verdict.DENY, "tenant-allow-list")


def test_lists_apply_on_top_of_the_license_rules() -> None:
    production = tenant(Environment.PRODUCTION, allow=("alpaca-*",))
    decision = decide(production, REGISTRY.models["alpaca-7b"], REGISTRY)
    assert decision.verdict is Verdict.DENY and decision.rule == "non-commercial-license-in-production"
