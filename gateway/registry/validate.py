"""Checks that need the whole registry: license keys, backend ids, engine/architecture support, and one
license per engine model (backends of different licenses never share a url and served model name)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from gateway.registry.engines import ARCHITECTURE_SUPPORT, why_engine_cannot_serve
from gateway.registry.schema import Backend, Engine, License, Model

OriginOf = Callable[[str, str], Path]


def cross_check(
    licenses: dict[str, License], raw_models: dict[str, dict], models: dict[str, Model], origin: OriginOf
) -> list[str]:
    """`raw_models` are checked too, so an entry with a schema error still has its license checked."""
    problems: list[str] = []
    for model_id, raw in raw_models.items():
        problems.extend(_check_license(model_id, raw.get("license"), licenses, origin))
    backend_owner: dict[str, str] = {}
    for model in models.values():
        problems.extend(_check_backends(model, backend_owner, origin))
        problems.extend(_check_twin(model, models, licenses, origin))
    problems.extend(_check_one_license_per_engine_model(models, origin))
    return problems


def _check_one_license_per_engine_model(models: dict[str, Model], origin: OriginOf) -> list[str]:
    """Two model ids of different licenses on one engine model would let non-commercial weights be served
    (and audited) under a commercial id. Aliases under the same license may share a backend."""
    problems: list[str] = []
    seen: dict[tuple[str, str], list[tuple[Model, int, Backend]]] = {}
    for model in models.values():
        for index, backend in enumerate(model.backends):
            key = backend.engine_model(model.id)
            clash = next((other for other in seen.get(key, ())
                          if other[0].license != model.license
                          and not (backend.shared_with_other_licenses and other[2].shared_with_other_licenses)),
                         None)
            seen.setdefault(key, []).append((model, index, backend))
            if clash is None:
                continue
            other, other_index, _ = clash
            url, served = key
            problems.append(
                f"{origin(model.id, 'backends')}: model '{model.id}': field 'backends.{index}.url': engine model "
                f"{served!r} at {url} (url + served_model_name) already backs model '{other.id}' "
                f"({origin(other.id, 'backends')}, field 'backends.{other_index}') under license "
                f"'{other.license}', not '{model.license}': one engine serves one set of weights, under one "
                "license. Point each at its own engine (test fixtures only: set "
                "shared_with_other_licenses: true on every backend sharing it)")
    return problems


def _check_twin(model: Model, models: dict[str, Model], licenses: dict[str, License],
                origin: OriginOf) -> list[str]:
    if model.commercial_twin is None:
        return []
    where = f"{origin(model.id, 'commercial_twin')}: model '{model.id}': field 'commercial_twin'"
    twin = models.get(model.commercial_twin)
    if twin is None:
        return [f"{where}: unknown model {model.commercial_twin!r}"]
    twin_license = licenses.get(twin.license)
    if twin_license is not None and twin_license.commercial_use.value == "no":
        return [f"{where}: {twin.id!r} is not commercially usable either ({twin.license})"]
    return []


def _check_license(model_id: str, key: object, licenses: dict[str, License], origin: OriginOf) -> list[str]:
    if not isinstance(key, str) or key in licenses:
        return []  # a missing or non-string key is already a schema error
    known = ", ".join(sorted(licenses)) or "none defined"
    return [
        f"{origin(model_id, 'license')}: model '{model_id}': field 'license': "
        f"unknown license key {key!r} (known: {known})"
    ]


def _check_backends(model: Model, backend_owner: dict[str, str], origin: OriginOf) -> list[str]:
    problems: list[str] = []
    where = f"{origin(model.id, 'backends')}: model '{model.id}'"
    declared = {support.engine: SpecifierSet(support.versions) for support in model.engines}
    for index, backend in enumerate(model.backends):
        field = f"backends.{index}"
        owner = backend_owner.setdefault(backend.id, model.id)
        if owner != model.id:
            problems.append(f"{where}: field '{field}.id': backend id {backend.id!r} already used by '{owner}'")
        reason = why_engine_cannot_serve(backend.engine, backend.engine_version, model.architecture)
        if reason:
            problems.append(f"{where}: field '{field}.engine_version': {reason}")
            continue
        spec = declared.get(backend.engine)
        if spec is None:
            problems.append(
                f"{where}: field '{field}.engine': {backend.engine.value} is not among this model's engines"
            )
        elif not spec.contains(Version(backend.engine_version), prereleases=True):
            problems.append(
                f"{where}: field '{field}.engine_version': {backend.engine.value} {backend.engine_version} "
                f"is outside this model's declared versions ({spec})"
            )
    for index, support in enumerate(model.engines):
        problems.extend(_check_declared_engine(model, index, support.engine, support.versions, origin))
    return problems


def _check_declared_engine(
    model: Model, index: int, engine: Engine, versions: str, origin: OriginOf
) -> list[str]:
    """A declared engine range must not promise versions that cannot serve the architecture."""
    supported = ARCHITECTURE_SUPPORT[engine].get(model.architecture)
    where = f"{origin(model.id, 'engines')}: model '{model.id}': field 'engines.{index}"
    if supported is None:
        return [f"{where}.engine': {engine.value} cannot serve {model.architecture} at any version"]
    if str(supported) and not str(SpecifierSet(versions)):
        return [
            f"{where}.versions': {engine.value} serves {model.architecture} only at "
            f"{engine.value}{supported}; say so (versions: \"{supported}\")"
        ]
    return []
