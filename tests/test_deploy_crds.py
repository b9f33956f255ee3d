"""The custom resources deploy/ emits (Prometheus Operator, CloudNativePG, KEDA, the Inference Extension,
cert-manager, Gateway API), validated strictly against schemas kubernetes-validate does not have
(tests/support/crd_schemas.py, written from the upstream CRDs), in every overlay and optional component."""

from __future__ import annotations

import copy

import jsonschema
import pytest

from tests.support.crd_schemas import SCHEMAS
from tests.support.deploy import ROOT, build, objects

BUILTIN_GROUPS = ("v1", "apps/", "batch/", "policy/", "autoscaling/", "networking.k8s.io/", "scheduling.k8s.io/",
                  "rbac.authorization.k8s.io/")
BUILDS = {"dev": ("deploy/components/redis-tls", "deploy/components/ingress", "deploy/components/gateway-api"),
          "prod": ("deploy/overlays/prod/keda", "deploy/overlays/prod/inference-pool", "deploy/components/redis-tls",
                   "deploy/components/gateway-api")}


def _custom(docs: list[dict]) -> list[dict]:
    return [d for d in docs if not d["apiVersion"].startswith(BUILTIN_GROUPS)]


@pytest.fixture(scope="module")
def custom_resources(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("crds")
    found = []
    for overlay, components in BUILDS.items():
        found += _custom(objects(overlay))
        found += _custom(build(ROOT, tmp, overlay, components))
    return found


def test_every_custom_resource_matches_its_crd_schema_strictly(custom_resources: list[dict]) -> None:
    kinds = {(d["apiVersion"], d["kind"]) for d in custom_resources}
    assert kinds == set(SCHEMAS), f"unchecked kinds: {kinds - set(SCHEMAS)}; unused schemas: {set(SCHEMAS) - kinds}"
    for doc in custom_resources:
        errors = sorted(jsonschema.Draft202012Validator(SCHEMAS[(doc["apiVersion"], doc["kind"])]).iter_errors(doc),
                        key=lambda e: e.path)
        assert not errors, f"{doc['kind']} {doc['metadata']['name']}: " + "; ".join(
            f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


@pytest.mark.parametrize(("kind", "path", "wrong"), [
    ("Cluster", ("spec", "postgresql"), "synchronus"),  # a misspelt field
    ("ScaledObject", ("spec",), "replicas"),  # a field of another kind
    ("InferencePool", ("spec",), "extensionRef"),  # the pre-v1 name of endpointPickerRef
    ("HTTPRoute", ("spec", "rules", 0, "timeouts"), "idle"),
])
def test_the_schemas_refuse_a_field_the_crd_does_not_have(custom_resources: list[dict], kind: str, path: tuple,
                                                           wrong: str) -> None:
    doc = copy.deepcopy(next(d for d in custom_resources if d["kind"] == kind))
    target = doc
    for step in path:
        target = target[step]
    target[wrong] = {}
    assert list(jsonschema.Draft202012Validator(SCHEMAS[(doc["apiVersion"], kind)]).iter_errors(doc))


def test_the_dev_overlay_needs_no_crd() -> None:
    """A laptop cluster has no operator installed: the dev overlay must apply without one."""
    assert not _custom(objects("dev"))
