"""`/v1/models` objects: OpenAI's fields plus license, commercial use, context length and hardware.

A tenant sees only the models it may call (allowed, or substituted by a twin it may call), each with
its `availability` here (a model whose backends cannot be reached from this gateway says so).
"""

from __future__ import annotations

from gateway.wire.protocol import ModelCard, ModelHardware
from gateway.policy.decide import decide
from gateway.registry import Model, Registry
from gateway.tenancy.tenants import Tenant


def visible_models(registry: Registry, tenant: Tenant) -> list[Model]:
    return [m for m in registry.models.values() if decide(tenant, m, registry).allowed]


def model_card(registry: Registry, model: Model, created: int, availability: str) -> ModelCard:
    license_ = registry.license_of(model)
    gpu = model.hardware.min_gpu
    return ModelCard(
        id=model.id,
        created=created,
        owned_by=model.hf_repo.split("/", 1)[0],
        family=model.family,
        license=model.license,
        license_name=license_.name,
        commercial_use=license_.commercial_use.value,
        license_conditions=[condition.id for condition in license_.conditions],
        context_length=model.context_length,
        architecture=model.architecture,
        hardware=ModelHardware(
            fp16_weight_gb=model.hardware.fp16_weight_gb,
            min_gpu="none" if gpu.count == 0 else f"{gpu.count}x {gpu.type}",
            tensor_parallel_size=model.hardware.tensor_parallel_size,
            cpu_fallback_realistic=model.hardware.cpu_fallback_realistic,
        ),
        availability=availability,
    )
