"""The shape of `model_registry.yaml`: licenses, models, their hardware, engines and backends.

Plain pydantic models, validated once at start-up (and on reload). Cross-entry checks (license keys,
duplicate ids, engine support) live in `validate.py`, because they need the whole file.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CommercialUse(str, Enum):
    YES = "yes"
    NO = "no"
    CONDITIONAL = "conditional"


class Engine(str, Enum):
    VLLM = "vllm"
    LLAMA_CPP = "llama.cpp"
    SEQ2SEQ = "seq2seq"  # our own Transformers worker (gateway.workers.seq2seq)


class Role(str, Enum):
    PRIMARY = "primary"  # GPU engine
    FALLBACK = "fallback"  # CPU engine, used only when no primary can serve


# Every prompt format a model may declare. `gateway.prompts` holds one renderer per id; the list lives
# here, at the bottom of the stack, so the registry can be validated without importing the renderers.
PromptFormatId = Literal[
    "none",
    "llama-2-chat",
    "alpaca",
    "vicuna-v1.1",
    "guanaco",
    "stable-beluga",
    "redpajama-chat",
    "redpajama-instruct",
    "falcon-instruct",
    "falcon-180b-chat",
    "mpt-chat",
    "mpt-instruct",
    "mpt-30b-instruct",
    "flan-t5",
    "chatml",
]


class LicenseCondition(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    text: str


class License(_Strict):
    name: str
    commercial_use: CommercialUse
    conditions: tuple[LicenseCondition, ...] = ()
    url: AnyHttpUrl | None = None
    notes: str = ""


class GpuRequirement(_Strict):
    type: str  # e.g. "A10G-24GB", "A100-80GB"; "none" for models that need no GPU
    count: int = Field(ge=0)


class Hardware(_Strict):
    fp16_weight_gb: float = Field(gt=0)
    min_gpu: GpuRequirement
    tensor_parallel_size: int = Field(ge=1)
    cpu_fallback_realistic: bool


class EngineSupport(_Strict):
    """An engine that can serve this model, and which of its versions can."""

    engine: Engine
    versions: str = Field(default="", description="PEP 440 specifier, e.g. '<0.28'; empty = any")
    notes: str = ""

    @field_validator("versions")
    @classmethod
    def _is_specifier(cls, value: str) -> str:
        try:
            SpecifierSet(value)
        except InvalidSpecifier as exc:
            raise ValueError(f"not a version specifier: {value!r}") from exc
        return value


# A Hugging Face repo revision a deployment may download: a full commit hash. A branch (`main`) or a tag
# moves: the same manifest would download other bytes tomorrow, and a replica started later would serve
# other weights than its siblings.
COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")


def _commit_hash(value: str | None) -> str | None:
    if value is not None and not COMMIT_HASH.match(value):
        raise ValueError(f"not a commit hash: {value!r} (40 hex digits; a branch or tag moves)")
    return value


class GgufSource(_Strict):
    """Where a llama.cpp backend's quantized weights come from (a file in a Hugging Face repo)."""

    repo: str
    file: str = Field(pattern=r"^[^/]+\.gguf$")
    revision: str = Field(description="the repo's commit hash")
    # The file's size (decimal GB, as the repo lists it): the weights volume is sized from it.
    size_gb: float | None = Field(default=None, gt=0)

    @field_validator("revision")
    @classmethod
    def _is_pinned(cls, value: str) -> str:
        return _commit_hash(value)


class WeightFiles(_Strict):
    """The checkpoint files an engine loads from `hf_repo`: what a deployment downloads, and their size.

    Many 2023 repos hold the same weights twice (PyTorch .bin and .safetensors): a download limited to
    one format fetches half the bytes. `dtype` is the stored precision (FLAN-T5 and Stable Beluga 2 are
    stored in float32: twice their fp16 size)."""

    format: Literal["safetensors", "bin"]
    dtype: Literal["float16", "bfloat16", "float32"]

    @property
    def bytes_per_param(self) -> int:
        return 4 if self.dtype == "float32" else 2


class Backend(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    engine: Engine
    engine_version: str
    url: AnyHttpUrl
    role: Role = Role.PRIMARY
    served_model_name: str | None = Field(
        default=None, description="the name the engine knows the model by; defaults to the model id"
    )
    # llama.cpp backends: the GGUF file the deployment downloads (the Kubernetes renderer needs it).
    gguf: GgufSource | None = None
    # Requests in flight to this backend at most; beyond it the router skips it (None: no cap). With
    # `discovery: dns`, per engine process (pod).
    max_concurrency: int | None = Field(default=None, gt=0)
    # url: the URL is one upstream. dns: its host names a headless Service; every address it resolves to
    # is an upstream of its own (one engine pod each), routed, capped, probed and ejected on its own.
    discovery: Literal["url", "dns"] = "url"
    # TEST FIXTURES ONLY. One engine model (url + served model name) serves one set of weights, so it
    # may back several model ids only under one license: otherwise non-commercial weights could be
    # served under a commercial model id, and validation refuses it. A test fixture that stands one
    # tiny checkpoint in for ids of different licenses sets this on every backend sharing it.
    # Never set it in a deployment's registry.
    shared_with_other_licenses: bool = Field(
        default=False,
        description="test fixtures only: allow this engine model to also back models of other licenses",
    )

    @field_validator("engine_version")
    @classmethod
    def _is_version(cls, value: str) -> str:
        try:
            Version(value)
        except InvalidVersion as exc:
            raise ValueError(f"not a version: {value!r}") from exc
        return value

    @property
    def base_url(self) -> str:
        return str(self.url).rstrip("/")

    def engine_model(self, model_id: str) -> tuple[str, str]:
        """Which weights this backend serves: the engine's address and the name it knows them by."""
        return self.base_url, self.served_model_name or model_id


class Timeouts(_Strict):
    """Per-model overrides of the role defaults in settings (seconds)."""

    connect_s: float | None = Field(default=None, gt=0)
    first_byte_s: float | None = Field(default=None, gt=0)
    idle_s: float | None = Field(default=None, gt=0)
    total_s: float | None = Field(default=None, gt=0)
    # A non-streamed answer arrives whole when generation ends: its own bound (long answers are normal).
    generation_s: float | None = Field(default=None, gt=0)


class Model(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    family: str
    hf_repo: str
    # The repo revision a deployment downloads: a commit hash. Unset where none was verified; such a
    # model's weights downloader refuses to run until one is pinned (gateway/deploy).
    hf_revision: str | None = None
    # The files of `hf_repo` an engine loads (format and stored dtype); needed to deploy it.
    weights: WeightFiles | None = None
    params_b: float = Field(gt=0, description="parameters, in billions")
    architecture: str
    context_length: int = Field(gt=0)
    license: str
    hardware: Hardware
    prompt_format: PromptFormatId
    # Whether the engine's own chat template (tokenizer_config.json) is right for this model. When false,
    # the gateway renders chat itself and calls the engine's /v1/completions ([2/5]).
    native_chat_template: bool = False
    # Base models (prompt_format "none") refuse chat unless this is set.
    allow_chat_without_format: bool = False
    # The system prompt used when a chat has none (FastChat's per-model defaults, e.g. MPT-7B-chat's).
    default_system_prompt: str | None = None
    # Token ids that end a turn besides the tokenizer's EOS (MPT chat: <|im_end|> 50278, <|endoftext|> 0),
    # sent to engines that take `stop_token_ids` (vLLM).
    stop_token_ids: tuple[int, ...] = ()
    # max_tokens sent when a request sets none (a tenant's own default wins); unset: a chat may fill the
    # context and is reserved against rate limits as if it would, a completion gets OpenAI's 16.
    default_max_tokens: int | None = Field(default=None, gt=0)
    # A commercially usable model an opted-in tenant gets instead of a license denial ([3/5]).
    commercial_twin: str | None = None
    # Tenants that may see and call this model; empty = every tenant the license rules allow.
    private_to: tuple[str, ...] = ()
    timeouts: Timeouts = Timeouts()
    engines: tuple[EngineSupport, ...] = Field(min_length=1)
    backends: tuple[Backend, ...] = ()
    notes: str = ""

    @field_validator("hf_revision")
    @classmethod
    def _is_pinned(cls, value: str | None) -> str | None:
        return _commit_hash(value)


class RegistryFile(_Strict):
    licenses: dict[str, License] = {}
    models: tuple[Model, ...] = ()
