"""Tenants (`tenants.yaml`): who may call, from which environment, under which attested conditions.

API keys are stored only as SHA-256 hashes ("sha256:<hex>"). Keys are looked up by their hash, so the
lookup time does not depend on how much of a guessed key is right. A key's id in logs, metrics and
audit records is the first 8 hex digits of its hash, never the key.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import secrets
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.errors import ConfigError, field_path
from gateway.registry import NotUtf8Error, Registry, read_config_text
from gateway.admission.ratelimit import Limits
from gateway.admission.quota import Quotas
from gateway.wire.protocol import PRIVILEGED_EXTRAS

KEY_PREFIX = "sk-gw-"
# Matched in full (`re.fullmatch`): `$` alone also matches before a trailing newline, which YAML's `- |`
# block gives, and such a hash would pass validation and never match a key.
_HASH_PATTERN = re.compile(r"sha256:[0-9a-f]{64}")


class Environment(str, Enum):
    PRODUCTION = "production"
    STAGING = "staging"
    DEVELOPMENT = "development"
    RESEARCH = "research"


class LimitsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    max_concurrent: int | None = Field(default=None, gt=0)
    # Token quotas over UTC calendar periods (gateway/admission/quota.py): 429 insufficient_quota past them.
    tokens_per_day: int | None = Field(default=None, gt=0)
    tokens_per_month: int | None = Field(default=None, gt=0)


class TenantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    environment: Environment
    api_key_hashes: list[str] = Field(min_length=1)
    allow_models: list[str] = []  # glob patterns; empty = every model the license rules allow
    deny_models: list[str] = []
    attestations: list[str] = []  # license condition ids the tenant's legal team confirmed
    substitutions: bool = False  # opt in to a commercially usable twin instead of a 403
    admin: bool = False  # may call /admin/* (reload, backends)
    limits: LimitsSpec = LimitsSpec()
    # Engine knobs that cost the shared engines more than tokens (gateway.wire.protocol.PRIVILEGED_EXTRAS).
    engine_extras: list[str] = []
    # max_tokens for this tenant's requests that set none (overrides the model's `default_max_tokens`).
    default_max_tokens: int | None = Field(default=None, gt=0)

    @field_validator("engine_extras")
    @classmethod
    def _known_extras(cls, names: list[str]) -> list[str]:
        unknown = [name for name in names if name not in PRIVILEGED_EXTRAS]
        if unknown:
            raise ValueError(f"unknown engine extra(s) {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(sorted(PRIVILEGED_EXTRAS))}")
        return names


@dataclass(frozen=True)
class Tenant:
    name: str
    environment: Environment
    allow_models: tuple[str, ...]
    deny_models: tuple[str, ...]
    attestations: frozenset[str]
    substitutions: bool
    admin: bool
    limits: Limits
    engine_extras: frozenset[str] = frozenset()
    default_max_tokens: int | None = None
    quotas: Quotas = Quotas()

    def denies(self, model_id: str) -> bool:
        return any(fnmatch.fnmatchcase(model_id, pattern) for pattern in self.deny_models)

    def allows(self, model_id: str) -> bool:
        """An empty allow list allows every model (the license rules still apply)."""
        return not self.allow_models or any(fnmatch.fnmatchcase(model_id, p) for p in self.allow_models)


@dataclass(frozen=True)
class Caller:
    tenant: Tenant
    key_id: str
    key_hash: str = ""  # how the caller is found again in a reloaded directory ("" in open access)
    source: str = "file"  # where its key is kept: the tenants "file", or the "database" (gateway/store/keys.py)


class TenantsError(ConfigError):
    what = "tenants file"


@dataclass(frozen=True)
class TenantDirectory:
    tenants: dict[str, Tenant]
    by_key_hash: dict[str, Caller]

    def caller_for_key(self, key: str) -> Caller | None:
        return self.by_key_hash.get(hash_key(key))


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id(key_hash: str) -> str:
    return key_hash.removeprefix("sha256:")[:8]


def new_key() -> tuple[str, str]:
    """A fresh key (shown once) and the hash line to store."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hash_key(key)


def load_tenants(path: Path, registry: Registry) -> TenantDirectory:
    problems: list[str] = []
    try:
        document = yaml.safe_load(read_config_text(path)) or {}
    except NotUtf8Error as exc:
        raise TenantsError([str(exc)]) from None
    except (OSError, yaml.YAMLError) as exc:
        raise TenantsError([f"{path}: cannot read: {exc}"]) from None
    entries = document.get("tenants") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise TenantsError([f"{path}: field 'tenants': must be a list of tenants"])
    specs = [_parse(path, index, entry, problems) for index, entry in enumerate(entries)]
    specs = [spec for spec in specs if spec is not None]
    problems.extend(_cross_check(path, specs, registry))
    if problems:
        raise TenantsError(problems)
    return _directory(specs)


def _parse(path: Path, index: int, entry: Any, problems: list[str]) -> TenantSpec | None:
    name = entry.get("name") if isinstance(entry, dict) else None
    label = f"tenant '{name}'" if isinstance(name, str) else f"tenant #{index}"
    try:
        return TenantSpec.model_validate(entry)
    except ValidationError as exc:
        for error in exc.errors():
            where = field_path(error["loc"])
            problems.append(f"{path}: {label}: field '{where}': {error['msg']}")
        return None


def _cross_check(path: Path, specs: list[TenantSpec], registry: Registry) -> list[str]:
    problems: list[str] = []
    owners: dict[str, str] = {}
    names: set[str] = set()
    conditions = {c.id for lic in registry.licenses.values() for c in lic.conditions}
    for spec in specs:
        where = f"{path}: tenant '{spec.name}'"
        if spec.name in names:
            problems.append(f"{where}: field 'name': duplicate tenant name")
        names.add(spec.name)
        for i, key_hash in enumerate(spec.api_key_hashes):
            if not _is_hash(key_hash):
                why = ("has whitespace or a line break around it (YAML's `- |` keeps one; write the hash "
                       "as a plain value)" if _is_hash(key_hash.strip()) else "not a 'sha256:<64 hex>' hash")
                problems.append(f"{where}: field 'api_key_hashes.{i}': {why}")
            elif owners.setdefault(key_hash, spec.name) != spec.name or spec.api_key_hashes.count(key_hash) > 1:
                problems.append(f"{where}: field 'api_key_hashes.{i}': duplicate key hash "
                                f"(also used by tenant '{owners[key_hash]}')")
        for field in ("allow_models", "deny_models"):
            for i, pattern in enumerate(getattr(spec, field)):
                if not any(fnmatch.fnmatchcase(m, pattern) for m in registry.models):
                    problems.append(f"{where}: field '{field}.{i}': '{pattern}' matches no registry model")
        for i, attestation in enumerate(spec.attestations):
            if attestation not in conditions:
                problems.append(f"{where}: field 'attestations.{i}': '{attestation}' is no license "
                                f"condition in the registry (known: {', '.join(sorted(conditions))})")
    return problems


def _is_hash(value: str) -> bool:
    return _HASH_PATTERN.fullmatch(value) is not None


def _directory(specs: list[TenantSpec]) -> TenantDirectory:
    tenants: dict[str, Tenant] = {}
    by_key: dict[str, Caller] = {}
    for spec in specs:
        tenant = Tenant(
            name=spec.name,
            environment=spec.environment,
            allow_models=tuple(spec.allow_models),
            deny_models=tuple(spec.deny_models),
            attestations=frozenset(spec.attestations),
            substitutions=spec.substitutions,
            admin=spec.admin,
            limits=Limits(spec.limits.rpm, spec.limits.tpm, spec.limits.max_concurrent),
            engine_extras=frozenset(spec.engine_extras),
            default_max_tokens=spec.default_max_tokens,
            quotas=Quotas(spec.limits.tokens_per_day, spec.limits.tokens_per_month),
        )
        tenants[spec.name] = tenant
        for key_hash in spec.api_key_hashes:
            by_key[key_hash] = Caller(tenant, key_id(key_hash), key_hash)
    return TenantDirectory(tenants, by_key)
