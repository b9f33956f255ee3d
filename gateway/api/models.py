"""`/v1/models` objects: OpenAI's fields plus license, commercial use, context length and hardware."""

from __future__ import annotations

from gateway.api.protocol import ModelCard, ModelHardware, ModelList
from gateway.registry import Model, Registry


def model_card(registry: Registry, model: Model, created: int) -> ModelCard:
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
    )


def model_list(registry: Registry, created: int) -> ModelList:
    return ModelList(data=[model_card(registry, m, created) for m in registry.models.values()])
