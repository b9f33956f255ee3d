"""Golden tests for `gateway.prompts`: chat messages -> the exact prompt each 2023 model was tuned on.

No expected string here is computed by the code under test. They come from one of two places:

* FastChat (`fschat==0.2.36`, installed --no-deps by `make`), for the models whose format FastChat
  implements faithfully or is the authors' own: Vicuna (`vicuna_v1.1`), Llama-2-chat (`llama-2`),
  RedPajama-INCITE chat (`redpajama-incite`), MPT chat (`mpt-7b-chat`, `mpt-30b-chat`), Falcon-180B chat
  (`falcon-chat`), and Falcon-instruct without a system message (`falcon`). Expected strings are built
  at test time with `get_conv_template(...)`; two known deviations are asserted explicitly.
* Hand-written literals, for the models where FastChat falls back to generic templates or differs
  from the authors' code (Alpaca, Stable Beluga, Guanaco, MPT-instruct, FLAN-T5, RedPajama-instruct),
  each with its source next to it. Most come from the project's research notes
  (docs/reference/models.md), which cite the primary files.
"""

from __future__ import annotations

import pathlib
import typing
from collections.abc import Callable

import pytest
from fastchat.conversation import get_conv_template

from gateway.errors import GatewayError
from gateway.prompts.formats import FORMATS
from gateway.prompts.messages import Turn, to_turns
from gateway.wire.protocol import ChatMessage
from gateway.registry import load_registry
from gateway.registry.schema import PromptFormatId

REGISTRY_PATH = pathlib.Path(__file__).resolve().parents[1] / "model_registry.yaml"

# ---------------------------------------------------------------------------------------------------
# Conversations. A newline inside a message checks that content goes through untouched.
# ---------------------------------------------------------------------------------------------------
SYSTEM = "You are a concise geography tutor."
Q1 = "What is the capital of France?"
A1 = "The capital of France is Paris."
Q2 = "And of Italy?\nAnswer in one word."
A2 = "Rome."
Q3 = "Thanks! And Spain?"

CONV1 = [Q1]
CONV3 = [Q1, A1, Q2]
CONV5 = [Q1, A1, Q2, A2, Q3]
CONVERSATIONS = {"1-turn": CONV1, "3-turn": CONV3, "5-turn": CONV5}

# Default system prompts, copied from the sources (not from gateway code).
# FastChat conversation.py `vicuna_v1.1` / models.md section 4.
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                 "gives helpful, detailed, and polite answers to the user's questions.")
# artidoro/qlora examples/guanaco_generate.py `prompt` (note: "human" first, "user's" second).
GUANACO_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# stabilityai/StableBeluga2 README "Usage" code: system_prompt.
BELUGA_SYSTEM = ("You are Stable Beluga, an AI that follows instructions extremely well. Help as much as "
                 "you can. Remember, be safe, and don't do anything illegal.")
# FastChat conversation.py `mpt-7b-chat` / models.md section 10 (newline-separated bullets).
MPT_7B_CHAT_SYSTEM = (
    "- You are a helpful assistant chatbot trained by MosaicML.\n"
    "- You answer questions.\n"
    "- You are excited to be able to help the user, but will refuse to do anything that could be "
    "considered harmful to the user.\n"
    "- You are more than just an information source, you are also able to write poetry, short stories, "
    "and make jokes.")
# FastChat conversation.py `mpt-30b-chat` / models.md section 10.
MPT_30B_CHAT_SYSTEM = ("A conversation between a user and an LLM-based AI assistant. The assistant gives "
                       "helpful and honest answers.")


def _messages(messages: list[dict]) -> list[ChatMessage]:
    return [ChatMessage.model_validate(message) for message in messages]


def turns(texts: list[str], system: str | None = None) -> list[Turn]:
    """user, assistant, user, ... optionally preceded by one system turn."""
    head = [Turn("system", system)] if system is not None else []
    return head + [Turn("user" if i % 2 == 0 else "assistant", text) for i, text in enumerate(texts)]


_TEMPLATE_DEFAULT = object()


def fastchat(template: str, texts: list[str], system: object = _TEMPLATE_DEFAULT) -> str:
    """The prompt FastChat builds for `texts` (alternating user/assistant, ending with user)."""
    conv = get_conv_template(template)
    if system is not _TEMPLATE_DEFAULT:
        conv.set_system_message(system)
    for i, text in enumerate(texts):
        conv.append_message(conv.roles[i % 2], text)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def render(format_id: str, texts: list[str], system: str | None = None,
           default_system: str | None = None) -> str:
    return FORMATS[format_id].render(turns(texts, system), default_system=default_system)


# ===================================================================================================
# 1. Every prompt format id is covered, and matches the registry schema.
# ===================================================================================================

def test_format_ids_match_the_registry_schema() -> None:
    assert set(FORMATS) == set(typing.get_args(PromptFormatId))
    for format_id, fmt in FORMATS.items():
        assert fmt.id == format_id


# ===================================================================================================
# 2. Goldens against FastChat, where FastChat is the reference.
# ===================================================================================================

# (format id, FastChat template, system message in the request, default_system passed to render,
#  FastChat system: _TEMPLATE_DEFAULT keeps the template's own)
FASTCHAT_CASES = [
    # Vicuna v1.1/v1.3/v1.5: FastChat is LMSYS's own code.
    pytest.param("vicuna-v1.1", "vicuna_v1.1", None, None, _TEMPLATE_DEFAULT, id="vicuna-default-system"),
    pytest.param("vicuna-v1.1", "vicuna_v1.1", SYSTEM, None, SYSTEM, id="vicuna-system"),
    pytest.param("vicuna-v1.1", "vicuna_v1.1", SYSTEM, "a default", SYSTEM, id="vicuna-system-beats-default"),
    # Llama-2-chat: FastChat `llama-2` = meta-llama/llama generation.py (BOS left to the engine).
    pytest.param("llama-2-chat", "llama-2", None, None, _TEMPLATE_DEFAULT, id="llama2-no-system"),
    pytest.param("llama-2-chat", "llama-2", SYSTEM, None, SYSTEM, id="llama2-system"),
    # RedPajama-INCITE chat, with a system line (no-system case: see the deviation test below).
    pytest.param("redpajama-chat", "redpajama-incite", SYSTEM, None, SYSTEM, id="redpajama-system"),
    # MPT chat (ChatML). The format has no built-in default; the registry passes FastChat's defaults.
    pytest.param("mpt-chat", "mpt-7b-chat", None, MPT_7B_CHAT_SYSTEM, _TEMPLATE_DEFAULT,
                 id="mpt7b-chat-default-system"),
    pytest.param("mpt-chat", "mpt-30b-chat", None, MPT_30B_CHAT_SYSTEM, _TEMPLATE_DEFAULT,
                 id="mpt30b-chat-default-system"),
    pytest.param("mpt-chat", "mpt-7b-chat", SYSTEM, MPT_7B_CHAT_SYSTEM, SYSTEM, id="mpt-chat-system"),
    # ChatML with a system message is the same as MPT chat's (no system: hand-written goldens below).
    pytest.param("chatml", "mpt-30b-chat", SYSTEM, None, SYSTEM, id="chatml-system"),
    # Falcon-180B chat: FastChat `falcon-chat` = the official demo Space's format_prompt.
    pytest.param("falcon-180b-chat", "falcon-chat", None, None, _TEMPLATE_DEFAULT, id="falcon180b-no-system"),
    pytest.param("falcon-180b-chat", "falcon-chat", SYSTEM, None, SYSTEM, id="falcon180b-system"),
    # Falcon-7B/40B-instruct without a system message: FastChat `falcon` (with one: deviation below).
    pytest.param("falcon-instruct", "falcon", None, None, _TEMPLATE_DEFAULT, id="falcon-instruct-no-system"),
]


@pytest.mark.parametrize("texts", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
@pytest.mark.parametrize("format_id, template, system, default_system, fastchat_system", FASTCHAT_CASES)
def test_matches_fastchat(format_id: str, template: str, system: str | None, default_system: str | None,
                          fastchat_system: object, texts: list[str]) -> None:
    expected = fastchat(template, texts, fastchat_system)
    assert render(format_id, texts, system, default_system) == expected


@pytest.mark.parametrize("texts", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_redpajama_chat_without_system_drops_fastchats_leading_newline(texts: list[str]) -> None:
    # Documented deviation. The RedPajama-INCITE-Chat model card's template is "<human>: {instruction}\n<bot>:"
    # with nothing before it; FastChat's `redpajama-incite` (ADD_COLON_SINGLE with an empty system
    # message) emits system + sep, i.e. a leading "\n". We follow the card.
    fastchat_prompt = fastchat("redpajama-incite", texts)
    assert fastchat_prompt.startswith("\n<human>: ")  # the deviation is real
    assert render("redpajama-chat", texts) == fastchat_prompt[1:]


def test_redpajama_chat_card_example() -> None:
    # togethercomputer/RedPajama-INCITE-Chat-3B-v1 card, "Prompt Template" (models.md section 6).
    assert render("redpajama-chat", [Q1]) == f"<human>: {Q1}\n<bot>:"
    assert render("redpajama-chat", CONV3) == f"<human>: {Q1}\n<bot>: {A1}\n<human>: {Q2}\n<bot>:"


@pytest.mark.parametrize("texts", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_falcon_instruct_with_system_separates_it_by_a_blank_line(texts: list[str]) -> None:
    # Documented deviation. FastChat's `falcon` template (RWKV style) glues the system message to the
    # first "User:" with no separator; the official tiiuae/falcon-7b-instruct tokenizer_config.json
    # chat_template (PR #111) emits system_message.strip() and then "\n\nUser: " (models.md section 7).
    fastchat_prompt = fastchat("falcon", texts, SYSTEM)
    assert fastchat_prompt.startswith(SYSTEM + "User: ")  # the deviation is real
    assert render("falcon-instruct", texts, SYSTEM) == SYSTEM + "\n\n" + fastchat("falcon", texts)


def test_falcon_instruct_with_system_literal() -> None:
    # tiiuae/falcon-7b-instruct chat_template: "{system}\n\nUser: {u}\n\nAssistant: {a}...\n\nAssistant:".
    assert render("falcon-instruct", CONV3, SYSTEM) == (
        f"{SYSTEM}\n\nUser: {Q1}\n\nAssistant: {A1}\n\nUser: {Q2}\n\nAssistant:")


# Cross-checks of the FastChat-backed formats against the primary sources, written out by hand.
PRIMARY_SOURCE_GOLDENS = [
    # meta-llama/llama llama/generation.py: B_INST, E_INST, B_SYS="<<SYS>>\n", E_SYS="\n<</SYS>>\n\n";
    # each completed exchange is "<s>[INST] u [/INST] a </s>"; the engine adds the first <s>.
    pytest.param("llama-2-chat", CONV3, SYSTEM,
                 f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{Q1} [/INST] {A1} </s><s>[INST] {Q2} [/INST]",
                 id="llama2"),
    # models.md section 4 (FastChat vicuna_v1.1): " " after system/user turns, "</s>" after assistant turns.
    pytest.param("vicuna-v1.1", CONV3, None,
                 f"{VICUNA_SYSTEM} USER: {Q1} ASSISTANT: {A1}</s>USER: {Q2} ASSISTANT:", id="vicuna"),
    # HF blog falcon-180b.md / demo Space format_prompt: "System: {s}\nUser: {u}\nFalcon: {a}\nUser: ...\nFalcon:".
    pytest.param("falcon-180b-chat", CONV3, SYSTEM,
                 f"System: {SYSTEM}\nUser: {Q1}\nFalcon: {A1}\nUser: {Q2}\nFalcon:", id="falcon-180b-chat"),
    # models.md section 10: ChatML.
    pytest.param("mpt-chat", CONV1, SYSTEM,
                 f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n"
                 "<|im_start|>assistant\n", id="mpt-chat"),
]


@pytest.mark.parametrize("format_id, texts, system, expected", PRIMARY_SOURCE_GOLDENS)
def test_matches_primary_source(format_id: str, texts: list[str], system: str | None, expected: str) -> None:
    assert render(format_id, texts, system) == expected


# ===================================================================================================
# 3. Hand-written goldens where FastChat is not the reference.
# ===================================================================================================

HAND_GOLDENS = [
    # --- Guanaco: artidoro/qlora examples/guanaco_generate.py:
    #     system + " ### Human: {user_question}" + "### Assistant: " (no separators between turns).
    #     Later turns follow the OASST1 training text of timdettmers/openassistant-guanaco, which
    #     concatenates "### Human: ...### Assistant: ..." the same way.
    pytest.param("guanaco", CONV1, None, f"{GUANACO_SYSTEM} ### Human: {Q1}### Assistant: ",
                 id="guanaco-1"),
    pytest.param("guanaco", CONV3, None,
                 f"{GUANACO_SYSTEM} ### Human: {Q1}### Assistant: {A1}### Human: {Q2}### Assistant: ",
                 id="guanaco-3"),
    pytest.param("guanaco", CONV3, SYSTEM,
                 f"{SYSTEM} ### Human: {Q1}### Assistant: {A1}### Human: {Q2}### Assistant: ",
                 id="guanaco-3-system"),
    # --- Stable Beluga: stabilityai/StableBeluga2 README code form:
    #       system_prompt = "### System:\n{system}\n\n"
    #       prompt = f"{system_prompt}### User: {message}\n\n### Assistant:\n"
    #     (the README's prose block differs; models.md says the code form is the one to use). The multi-turn
    #     form is not documented (models.md: UNVERIFIED); the golden continues the code form: each
    #     assistant turn is "### Assistant:\n{answer}\n\n".
    pytest.param("stable-beluga", CONV1, None,
                 f"### System:\n{BELUGA_SYSTEM}\n\n### User: {Q1}\n\n### Assistant:\n", id="beluga-1"),
    pytest.param("stable-beluga", CONV1, SYSTEM,
                 f"### System:\n{SYSTEM}\n\n### User: {Q1}\n\n### Assistant:\n", id="beluga-1-system"),
    pytest.param("stable-beluga", CONV3, None,
                 f"### System:\n{BELUGA_SYSTEM}\n\n### User: {Q1}\n\n### Assistant:\n{A1}\n\n"
                 f"### User: {Q2}\n\n### Assistant:\n", id="beluga-3"),
    # --- Alpaca: tatsu-lab/stanford_alpaca train.py PROMPT_DICT["prompt_no_input"] / ["prompt_input"].
    pytest.param("alpaca", CONV1, None,
                 "Below is an instruction that describes a task. Write a response that appropriately "
                 f"completes the request.\n\n### Instruction:\n{Q1}\n\n### Response:", id="alpaca-no-input"),
    # A system message is the instruction, the user message its input (the with-input variant).
    pytest.param("alpaca", CONV1, SYSTEM,
                 "Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 f"### Instruction:\n{SYSTEM}\n\n### Input:\n{Q1}\n\n### Response:", id="alpaca-with-input"),
    # --- MPT-7B-Instruct: mosaicml/mpt-7b-instruct card / Space quick_pipeline.py (Dolly-style,
    #     single newlines): "{intro}\n### Instruction:\n{instruction}\n### Response:\n".
    pytest.param("mpt-instruct", CONV1, None,
                 "Below is an instruction that describes a task. Write a response that appropriately "
                 f"completes the request.\n### Instruction:\n{Q1}\n### Response:\n", id="mpt-instruct"),
    # A system message replaces the intro line (the gateway's mapping; the card has no system slot).
    pytest.param("mpt-instruct", CONV1, SYSTEM,
                 f"{SYSTEM}\n### Instruction:\n{Q1}\n### Response:\n", id="mpt-instruct-system"),
    # --- MPT-30B-Instruct: mosaicml/mpt-30b-instruct card, "Formatting" (format_prompt): blank lines,
    #     no colons, "###Instruction" without a space.
    pytest.param("mpt-30b-instruct", CONV1, None,
                 "Below is an instruction that describes a task. Write a response that appropriately "
                 f"completes the request.\n\n###Instruction\n{Q1}\n\n### Response\n", id="mpt-30b-instruct"),
    pytest.param("mpt-30b-instruct", CONV1, SYSTEM,
                 f"{SYSTEM}\n\n###Instruction\n{Q1}\n\n### Response\n", id="mpt-30b-instruct-system"),
    # --- FLAN-T5: plain natural-language instruction, no roles (google/flan-t5-* card example).
    pytest.param("flan-t5", ["translate English to German: How old are you?"], None,
                 "translate English to German: How old are you?", id="flan-t5-card-example"),
    # No turn format exists; models.md: "chat history must be flattened into text". The gateway's
    # flattening: system paragraph, then "User:"/"Assistant:" lines, ending in "Assistant:".
    pytest.param("flan-t5", CONV1, SYSTEM, f"{SYSTEM}\n\n{Q1}", id="flan-t5-system"),
    pytest.param("flan-t5", CONV3, None, f"User: {Q1}\nAssistant: {A1}\nUser: {Q2}\nAssistant:",
                 id="flan-t5-3"),
    pytest.param("flan-t5", CONV3, SYSTEM,
                 f"{SYSTEM}\n\nUser: {Q1}\nAssistant: {A1}\nUser: {Q2}\nAssistant:", id="flan-t5-3-system"),
    # --- "none" (base models that opted in to chat): same flattening as FLAN-T5.
    pytest.param("none", CONV1, None, Q1, id="none-1"),
    pytest.param("none", CONV3, SYSTEM,
                 f"{SYSTEM}\n\nUser: {Q1}\nAssistant: {A1}\nUser: {Q2}\nAssistant:", id="none-3-system"),
    # --- ChatML / MPT chat with no system message at all (no registry default): no system block, as in
    #     vLLM examples/template_chatml.jinja, which renders only the messages given. (FastChat is not the
    #     reference here: with an empty system message its CHATML style still emits an empty
    #     "<|im_start|>system\n<|im_end|>\n" block.)
    pytest.param("chatml", CONV3, None,
                 f"<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n{A1}<|im_end|>\n"
                 f"<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n", id="chatml-3-no-system"),
    pytest.param("mpt-chat", CONV1, None, f"<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n",
                 id="mpt-chat-1-no-system"),
    # --- RedPajama-INCITE-Instruct: card example "Q: The capital of France is?\nA:"; earlier turns
    #     become few-shot Q/A pairs, one per line.
    pytest.param("redpajama-instruct", ["The capital of France is?"], None,
                 "Q: The capital of France is?\nA:", id="redpajama-instruct-card-example"),
    pytest.param("redpajama-instruct", CONV3, None, f"Q: {Q1}\nA: {A1}\nQ: {Q2}\nA:", id="redpajama-instruct-3"),
    pytest.param("redpajama-instruct", CONV3, SYSTEM, f"{SYSTEM}\nQ: {Q1}\nA: {A1}\nQ: {Q2}\nA:",
                 id="redpajama-instruct-3-system"),
]


@pytest.mark.parametrize("format_id, texts, system, expected", HAND_GOLDENS)
def test_hand_written_golden(format_id: str, texts: list[str], system: str | None, expected: str) -> None:
    assert render(format_id, texts, system) == expected


def test_every_format_has_a_golden_with_and_without_system() -> None:
    """Guard: a new format id must come with goldens (both with and without a system message)."""
    covered: dict[str, set[bool]] = {}
    for case in FASTCHAT_CASES:
        format_id, _, system, *_ = case.values
        covered.setdefault(format_id, set()).add(system is not None)
    for case in HAND_GOLDENS:
        format_id, _, system, _ = case.values
        covered.setdefault(format_id, set()).add(system is not None)
    covered.setdefault("redpajama-chat", set()).add(False)  # deviation test
    covered.setdefault("falcon-instruct", set()).add(True)  # deviation test
    missing = {fid: {True, False} - covered.get(fid, set()) for fid in FORMATS}
    assert {fid: gaps for fid, gaps in missing.items() if gaps} == {}


# ===================================================================================================
# 4. Every registry model with a chat format renders its golden.
# ===================================================================================================

LLAMA2_CHAT = ("llama-2-7b-chat", "llama-2-13b-chat", "llama-2-70b-chat")
VICUNA = ("vicuna-7b-v1.3", "vicuna-13b-v1.3", "vicuna-33b-v1.3", "vicuna-7b-v1.5", "vicuna-13b-v1.5",
          "vicuna-7b-v1.5-16k", "vicuna-13b-v1.5-16k")
GUANACO = ("guanaco-7b", "guanaco-13b", "guanaco-33b", "guanaco-65b")
REDPAJAMA_CHAT = ("redpajama-incite-chat-3b", "redpajama-incite-7b-chat")
REDPAJAMA_INSTRUCT = ("redpajama-incite-instruct-3b", "redpajama-incite-7b-instruct")
FALCON_INSTRUCT = ("falcon-7b-instruct", "falcon-40b-instruct")
FLAN_T5 = ("flan-t5-small", "flan-t5-base", "flan-t5-large", "flan-t5-xl", "flan-t5-xxl")
STABLE_BELUGA = ("stable-beluga-1", "stable-beluga-2", "stable-beluga-7b", "stable-beluga-13b")
SINGLE_TURN = ("alpaca-7b", "mpt-7b-instruct", "mpt-30b-instruct")

# (model ids, conversation, expected prompt). Multi-turn models get CONV3 (user, assistant, user);
# single-turn ones get CONV1 (their CONV3 must be refused, tested below). No system message in the
# request: the registry's default_system_prompt, if any, is passed to render().
REGISTRY_GOLDENS: list[tuple[tuple[str, ...], list[str], Callable[[], str]]] = [
    (LLAMA2_CHAT, CONV3, lambda: fastchat("llama-2", CONV3)),
    (VICUNA, CONV3, lambda: fastchat("vicuna_v1.1", CONV3)),
    # models.md section 6 / card; FastChat `redpajama-incite` minus its leading "\n" (see deviation test).
    (REDPAJAMA_CHAT, CONV3, lambda: fastchat("redpajama-incite", CONV3).removeprefix("\n")),
    (("falcon-180b-chat",), CONV3, lambda: fastchat("falcon-chat", CONV3)),
    (FALCON_INSTRUCT, CONV3, lambda: fastchat("falcon", CONV3)),
    # FastChat templates with their own default systems (the MosaicML bullets / the 30B sentence).
    (("mpt-7b-chat",), CONV3, lambda: fastchat("mpt-7b-chat", CONV3)),
    (("mpt-30b-chat",), CONV3, lambda: fastchat("mpt-30b-chat", CONV3)),
    # qlora guanaco_generate.py.
    (GUANACO, CONV3, lambda: f"{GUANACO_SYSTEM} ### Human: {Q1}### Assistant: {A1}### Human: {Q2}### Assistant: "),
    # StableBeluga2 README code form (same card format for StableBeluga1/-7B/-13B).
    (STABLE_BELUGA, CONV3, lambda: (f"### System:\n{BELUGA_SYSTEM}\n\n### User: {Q1}\n\n### Assistant:\n{A1}\n\n"
                                    f"### User: {Q2}\n\n### Assistant:\n")),
    # RedPajama-INCITE-Instruct card ("Q: ...\nA:").
    (REDPAJAMA_INSTRUCT, CONV3, lambda: f"Q: {Q1}\nA: {A1}\nQ: {Q2}\nA:"),
    # FLAN-T5: flattened (see HAND_GOLDENS).
    (FLAN_T5, CONV3, lambda: f"User: {Q1}\nAssistant: {A1}\nUser: {Q2}\nAssistant:"),
    # Stanford Alpaca train.py PROMPT_DICT["prompt_no_input"].
    (("alpaca-7b",), CONV1, lambda: ("Below is an instruction that describes a task. Write a response that "
                                     "appropriately completes the request.\n\n"
                                     f"### Instruction:\n{Q1}\n\n### Response:")),
    # mosaicml/mpt-7b-instruct card: single newlines, "### Instruction:" / "### Response:".
    (("mpt-7b-instruct",), CONV1, lambda: ("Below is an instruction that describes a task. Write a response "
                                           "that appropriately completes the request.\n"
                                           f"### Instruction:\n{Q1}\n### Response:\n")),
    # mosaicml/mpt-30b-instruct card, section "Formatting" ("This model was trained on data formatted as
    # follows"): template = "Below is an instruction that describes a task. Write a response that
    # appropriately completes the request.\n\n###Instruction\n{instruction}\n\n### Response\n".
    # Blank lines, no colons, and no space in "###Instruction" -- not the 7B card's format. FastChat's
    # `mpt-30b-instruct` template also uses "\n\n" separators.
    (("mpt-30b-instruct",), CONV1, lambda: ("Below is an instruction that describes a task. Write a response "
                                            "that appropriately completes the request.\n\n"
                                            f"###Instruction\n{Q1}\n\n### Response\n")),
]
REGISTRY_GOLDEN_BY_ID = {model_id: (texts, expected)
                         for ids, texts, expected in REGISTRY_GOLDENS for model_id in ids}


@pytest.fixture(scope="module")
def registry():
    return load_registry([REGISTRY_PATH])


def _chat_model_ids() -> list[str]:
    reg = load_registry([REGISTRY_PATH])
    return [m.id for m in reg.models.values() if m.prompt_format != "none"]


def test_every_registry_chat_model_has_a_golden() -> None:
    assert sorted(_chat_model_ids()) == sorted(REGISTRY_GOLDEN_BY_ID)


@pytest.mark.parametrize("model_id", _chat_model_ids())
def test_registry_model_golden(registry, model_id: str) -> None:
    model = registry.models[model_id]
    texts, expected = REGISTRY_GOLDEN_BY_ID[model_id]
    prompt = FORMATS[model.prompt_format].render(turns(texts), default_system=model.default_system_prompt)
    assert prompt == expected()


@pytest.mark.parametrize("model_id", SINGLE_TURN)
def test_registry_single_turn_models_refuse_a_conversation(registry, model_id: str) -> None:
    model = registry.models[model_id]
    with pytest.raises(GatewayError) as err:
        FORMATS[model.prompt_format].render(turns(CONV3), default_system=model.default_system_prompt)
    assert err.value.status == 400
    assert err.value.param.startswith("messages[1]")


# ===================================================================================================
# 5. Stop strings: each format names what ends the model's turn.
# ===================================================================================================

# format id -> a stop string the model needs (sources: models.md "Stop" lines per family).
REQUIRED_STOPS = {
    "vicuna-v1.1": "USER:",
    "llama-2-chat": "</s>",
    "guanaco": "### Human",
    "stable-beluga": "### User:",
    "redpajama-chat": "<human>",
    "redpajama-instruct": "\nQ:",
    "falcon-instruct": "\nUser:",
    "falcon-180b-chat": "\nUser:",
    "mpt-chat": "<|im_end|>",
    "chatml": "<|im_end|>",
    "mpt-instruct": "### Instruction",
    "mpt-30b-instruct": "###Instruction",
    "alpaca": "### Instruction:",
}


@pytest.mark.parametrize("format_id, stop", REQUIRED_STOPS.items())
def test_format_declares_stop(format_id: str, stop: str) -> None:
    assert stop in FORMATS[format_id].stop


def test_vicuna_also_stops_on_eos_text() -> None:
    assert "</s>" in FORMATS["vicuna-v1.1"].stop


def test_every_chat_format_has_a_stop_entry() -> None:
    assert set(REQUIRED_STOPS) == set(FORMATS) - {"flan-t5", "none"}


# The text that follows an assistant answer in a multi-turn prompt is what the model would emit if it
# ran on past its turn; one of the declared stops must catch it.
MULTI_TURN_FORMATS = [fid for fid in REQUIRED_STOPS if fid not in ("alpaca", "mpt-instruct", "mpt-30b-instruct")]


@pytest.mark.parametrize("format_id", MULTI_TURN_FORMATS)
def test_stops_catch_the_next_user_turn(format_id: str) -> None:
    prompt = render(format_id, CONV3)
    after_answer = prompt[prompt.index(A1) + len(A1):prompt.index(Q2)]
    assert any(stop in after_answer for stop in FORMATS[format_id].stop), after_answer


# ===================================================================================================
# 6. Messages a format cannot express -> 400 naming the message.
# ===================================================================================================

def _error(call: Callable[[], object]) -> GatewayError:
    with pytest.raises(GatewayError) as err:
        call()
    assert err.value.status == 400
    return err.value


USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}

TO_TURNS_ERRORS = [
    pytest.param([USER, {"role": "assistant", "content": None,
                         "tool_calls": [{"id": "c1", "type": "function",
                                         "function": {"name": "f", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "42"}], 1, id="assistant-tool-calls"),
    pytest.param([USER, ASSISTANT, {"role": "tool", "tool_call_id": "c1", "content": "42"}], 2, id="tool-role"),
    pytest.param([USER, ASSISTANT, {"role": "function", "name": "f", "content": "42"}], 2, id="function-role"),
    pytest.param([USER, {"role": "assistant", "content": None,
                         "function_call": {"name": "f", "arguments": "{}"}}], 1, id="legacy-function-call"),
    pytest.param([USER, ASSISTANT, {"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}], 2, id="image-part"),
    pytest.param([{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}], 0, id="audio-part"),
]


@pytest.mark.parametrize("messages, index", TO_TURNS_ERRORS)
def test_to_turns_rejects_inexpressible_messages(messages: list[dict], index: int) -> None:
    err = _error(lambda: to_turns(_messages(messages)))
    assert err.param.startswith(f"messages[{index}]"), err.param


# Conversation shapes no 2023 format can express; (turns, index of the offending message).
SHAPE_ERRORS = [
    pytest.param([Turn("user", Q1), Turn("assistant", A1), Turn("system", SYSTEM), Turn("user", Q2)], 2,
                 id="system-mid-conversation"),
    pytest.param([Turn("user", Q1), Turn("user", Q2)], 1, id="two-users-in-a-row"),
    pytest.param([Turn("system", SYSTEM), Turn("user", Q1), Turn("user", Q2)], 2,
                 id="two-users-in-a-row-after-system"),
    pytest.param([Turn("user", Q1), Turn("assistant", A1), Turn("assistant", A2), Turn("user", Q2)], 2,
                 id="two-assistants-in-a-row"),
    pytest.param([Turn("assistant", A1), Turn("user", Q1)], 0, id="starts-with-assistant"),
    pytest.param([Turn("user", Q1), Turn("assistant", A1)], 1, id="ends-with-assistant"),
    pytest.param([Turn("system", SYSTEM), Turn("user", Q1), Turn("assistant", A1)], 2,
                 id="ends-with-assistant-after-system"),
]


@pytest.mark.parametrize("format_id", sorted(FORMATS))
@pytest.mark.parametrize("conversation, index", SHAPE_ERRORS)
def test_every_format_rejects_inexpressible_shapes(format_id: str, conversation: list[Turn], index: int) -> None:
    err = _error(lambda: FORMATS[format_id].render(conversation))
    assert err.param.startswith(f"messages[{index}]"), err.param


@pytest.mark.parametrize("format_id", sorted(FORMATS))
@pytest.mark.parametrize("conversation", [[], [Turn("system", SYSTEM)]], ids=["empty", "system-only"])
def test_every_format_needs_a_user_message(format_id: str, conversation: list[Turn]) -> None:
    err = _error(lambda: FORMATS[format_id].render(conversation))
    assert err.param.startswith("messages[")


@pytest.mark.parametrize("format_id", ["alpaca", "mpt-instruct", "mpt-30b-instruct"])
@pytest.mark.parametrize("system, index", [(None, 1), (SYSTEM, 2)], ids=["no-system", "system"])
def test_single_turn_formats_reject_multi_turn(format_id: str, system: str | None, index: int) -> None:
    err = _error(lambda: render(format_id, CONV3, system))
    assert err.param.startswith(f"messages[{index}]"), err.param


def test_errors_name_the_index_in_the_original_messages() -> None:
    # Through to_turns: developer (-> system) at 0, then a non-alternating user at 2.
    messages = [{"role": "developer", "content": SYSTEM}, USER, {"role": "user", "content": "again"}]
    err = _error(lambda: FORMATS["vicuna-v1.1"].render(to_turns(_messages(messages))))
    assert err.param.startswith("messages[2]"), err.param


# ===================================================================================================
# 7. OpenAI message forms: developer role, text-part lists.
# ===================================================================================================

def test_developer_role_is_system() -> None:
    messages = [{"role": "developer", "content": SYSTEM}, {"role": "user", "content": Q1}]
    assert to_turns(_messages(messages)) == [Turn("system", SYSTEM), Turn("user", Q1)]
    # Rendered exactly like a system message (Vicuna: "{system} USER: {u} ASSISTANT:").
    assert FORMATS["vicuna-v1.1"].render(to_turns(_messages(messages))) == f"{SYSTEM} USER: {Q1} ASSISTANT:"


def test_developer_role_mid_conversation_is_rejected_like_system() -> None:
    messages = [USER, ASSISTANT, {"role": "developer", "content": SYSTEM}, USER]
    err = _error(lambda: FORMATS["llama-2-chat"].render(to_turns(_messages(messages))))
    assert err.param.startswith("messages[2]"), err.param


def test_text_parts_are_joined() -> None:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You are "}, {"type": "text", "text": "terse."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                     {"type": "text", "text": "of France?"}]},
    ]
    assert to_turns(_messages(messages)) == [Turn("system", "You are terse."), Turn("user", Q1)]
    assert FORMATS["llama-2-chat"].render(to_turns(_messages(messages))) == (
        f"[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\n{Q1} [/INST]")


def test_plain_string_content_passes_through() -> None:
    messages = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
                {"role": "user", "content": Q2}]
    assert to_turns(_messages(messages)) == [Turn("user", Q1), Turn("assistant", A1), Turn("user", Q2)]
