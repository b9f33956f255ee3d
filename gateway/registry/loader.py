"""Load `model_registry.yaml` (plus optional overlay files) into one validated `Registry`.

Overlays let a deployment reuse the ten-model registry as the source of truth and change only what
differs locally: a later file may add licenses and models, or restate an existing model id with just
the fields it changes (typically `backends`). Every problem is reported as one line naming the file,
the entry and the field, and all problems are reported together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.errors import ConfigError, field_path
from gateway.registry.schema import License, Model
from gateway.registry.validate import cross_check

_TOP_LEVEL_KEYS = {"licenses", "models"}


class RegistryError(ConfigError):
    what = "model registry"


class NotUtf8Error(ValueError):
    """A config file whose bytes are not UTF-8; the message is the config-error line naming the file."""


def read_config_text(path: Path) -> str:
    """The text of a UTF-8 config file. Raises `OSError`, or `NotUtf8Error` naming the file, the byte
    offset and line of the first byte that is not UTF-8 (say, a file saved as Latin-1)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise NotUtf8Error(f"{path}: not UTF-8 text: byte 0x{raw[exc.start]:02x} at byte offset {exc.start} "
                           f"(line {line}); save the file as UTF-8") from None


@dataclass(frozen=True)
class Registry:
    licenses: dict[str, License]
    models: dict[str, Model]
    sources: tuple[Path, ...] = ()
    # Models of the registry files that this deployment does not run (`gateway.registry.deployed`).
    undeployed: dict[str, Model] = field(default_factory=dict)

    def model(self, model_id: str) -> Model | None:
        return self.models.get(model_id)

    def license_of(self, model: Model) -> License:
        return self.licenses[model.license]


@dataclass
class _Merged:
    """Raw entries merged across files, remembering which file set each model field."""

    licenses: dict[str, Any] = field(default_factory=dict)
    license_origin: dict[str, Path] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    field_origin: dict[tuple[str, str], Path] = field(default_factory=dict)


def load_registry(paths: list[Path]) -> Registry:
    """Read, merge and validate the registry files, in order; raise `RegistryError` if invalid."""
    problems: list[str] = []
    merged = _Merged()
    for path in paths:
        document = _read_yaml(path, problems)
        if document is not None:
            _merge_file(path, document, merged, problems)
    licenses = _validate_licenses(merged, problems)
    models = _validate_models(merged, problems)
    problems.extend(cross_check(licenses, merged.models, models, lambda mid, fld: _origin(merged, mid, fld)))
    if problems:
        raise RegistryError(problems)
    return Registry(licenses=licenses, models=models, sources=tuple(paths))


def _read_yaml(path: Path, problems: list[str]) -> dict[str, Any] | None:
    try:
        document = yaml.safe_load(read_config_text(path))
    except OSError as exc:
        problems.append(f"{path}: cannot read: {exc.strerror}")
        return None
    except NotUtf8Error as exc:
        problems.append(str(exc))
        return None
    except yaml.YAMLError as exc:
        problems.append(f"{path}: not valid YAML: {exc}")
        return None
    if document is None:
        return {}
    if not isinstance(document, dict):
        problems.append(f"{path}: top level must be a mapping with 'licenses' and 'models'")
        return None
    for key in document.keys() - _TOP_LEVEL_KEYS:
        problems.append(f"{path}: field '{key}': unknown top-level key (expected licenses, models)")
    return document


def _merge_file(path: Path, document: dict[str, Any], merged: _Merged, problems: list[str]) -> None:
    licenses = document.get("licenses") or {}
    if not isinstance(licenses, dict):
        problems.append(f"{path}: field 'licenses': must be a mapping of license key to terms")
    else:
        for key, terms in licenses.items():
            merged.licenses[str(key)] = terms
            merged.license_origin[str(key)] = path
    entries = document.get("models") or []
    if not isinstance(entries, list):
        problems.append(f"{path}: field 'models': must be a list of model entries")
        return
    seen_here: set[str] = set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            problems.append(f"{path}: model #{index}: field 'id': missing (every entry needs an id)")
            continue
        model_id = entry["id"]
        if model_id in seen_here:
            problems.append(f"{path}: model '{model_id}': field 'id': duplicate id in this file")
            continue
        seen_here.add(model_id)
        target = merged.models.setdefault(model_id, {})
        for name, value in entry.items():
            target[name] = value
            merged.field_origin[(model_id, name)] = path


def _origin(merged: _Merged, model_id: str, field_name: str) -> Path:
    origin = merged.field_origin.get((model_id, field_name))
    return origin or merged.field_origin.get((model_id, "id"), Path("<registry>"))


def _validate_licenses(merged: _Merged, problems: list[str]) -> dict[str, License]:
    licenses: dict[str, License] = {}
    for key, terms in merged.licenses.items():
        try:
            licenses[key] = License.model_validate(terms)
        except ValidationError as exc:
            for error in exc.errors():
                where = field_path(error["loc"])
                problems.append(
                    f"{merged.license_origin[key]}: license '{key}': field '{where}': {error['msg']}"
                )
    return licenses


def _validate_models(merged: _Merged, problems: list[str]) -> dict[str, Model]:
    models: dict[str, Model] = {}
    for model_id, raw in merged.models.items():
        try:
            models[model_id] = Model.model_validate(raw)
        except ValidationError as exc:
            for error in exc.errors():
                where = field_path(error["loc"])
                path = _origin(merged, model_id, str(error["loc"][0]) if error["loc"] else "id")
                problems.append(f"{path}: model '{model_id}': field '{where}': {_message(error)}")
    return models


def _message(error: Any) -> str:
    if error["type"] == "missing":
        return "missing (required)"
    if error["type"] == "literal_error":
        return f"{error['msg']} (got {error['input']!r})"
    return str(error["msg"])
