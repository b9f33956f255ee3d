"""Image placeholders and what each overlay maps them to.

Every container in deploy/ names a placeholder, `llm-gateway/<key>`: `gateway` (the gateway and the
weights downloaders), `seq2seq-<version>` (the FLAN-T5 worker image), `vllm-<version>`,
`llamacpp-<version>`, `redis`, `postgres`. Each overlay maps all of them in one kustomize `images` list
(rendered into its generated component, from deploy/fleet.yaml), so an override reaches every container
that uses the image, init containers included, and two engine versions never share an entry: a digest
pinned for vLLM 0.32.0 cannot pin 0.27.1 too.
"""

from __future__ import annotations

from typing import Any

from gateway.deploy.fleet import ImageRef
from gateway.registry.schema import Engine

PREFIX = "llm-gateway/"
GATEWAY, REDIS, POSTGRES = "gateway", "redis", "postgres"
# Engine -> (repository, tag format); the tag is the registry's engine_version.
ENGINE_IMAGES = {Engine.VLLM: ("vllm/vllm-openai", "v{}"),
                 Engine.LLAMA_CPP: ("ghcr.io/abetlen/llama-cpp-python", "v{}"),
                 Engine.SEQ2SEQ: ("llm-gateway-worker", "{}")}  # the Dockerfile's `worker` target
FIXED_IMAGES = {REDIS: ("redis", "7.4.1-alpine"), POSTGRES: ("postgres", "16.4-bookworm")}


def engine_key(engine: Engine, version: str) -> str:
    return f"{engine.value.replace('.', '')}-{version}"


def placeholder(key: str) -> str:
    return PREFIX + key


def default_image(key: str, gateway_version: str) -> tuple[str, str]:
    if key == GATEWAY:
        return "llm-gateway", gateway_version  # the Dockerfile's `gateway` target
    if key in FIXED_IMAGES:
        return FIXED_IMAGES[key]
    for engine, (name, tag) in ENGINE_IMAGES.items():
        prefix = engine_key(engine, "")
        if key.startswith(prefix):
            return name, tag.format(key[len(prefix):])
    raise KeyError(key)


def image_entries(keys: list[str], overrides: dict[str, ImageRef], gateway_version: str) -> list[dict[str, Any]]:
    """The kustomize `images` list for these placeholders, overrides applied (sorted by placeholder)."""
    entries = []
    for key in sorted(keys):
        name, tag = default_image(key, gateway_version)
        ref = overrides.get(key, ImageRef())
        entry: dict[str, Any] = {"name": placeholder(key), "newName": ref.name or name}
        if ref.digest:
            entry["digest"] = ref.digest
        else:
            entry["newTag"] = ref.tag or tag
        entries.append(entry)
    return entries
