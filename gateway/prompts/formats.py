"""One renderer per prompt format id in the registry: chat turns -> the exact prompt the model was tuned on.

Sources: FastChat's conversation templates (github.com/lm-sys/FastChat, fastchat/conversation.py) for
Vicuna, Llama-2-chat, RedPajama-INCITE chat and MPT chat; the model cards / training code for the rest
(Stanford Alpaca's `train.py` at github.com/tatsu-lab/stanford_alpaca, the StableBeluga2 README on
huggingface.co/stabilityai/StableBeluga2, qlora's `examples/guanaco_generate.py` at
github.com/artidoro/qlora, the falcon-7b-instruct tokenizer template on huggingface.co/tiiuae, the
Falcon-180B demo, the MPT-7B-Instruct card on huggingface.co/mosaicml); docs/reference/models.md
gathers them. The engine adds the BOS token itself, so no prompt starts with `<s>`.

Each format also names its control strings (`controls`: turn markers and the tokenizer's special
tokens), which message text may not contain (`gateway.prompts.messages.refuse_control_strings`), and
the EOS its models' tokenizer ends a turn with (`eos`): a stop string equal to it is not sent upstream.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import GatewayError
from gateway.prompts.messages import Turn, require_alternation, split_system


@dataclass(frozen=True)
class Affix:
    prefix: str
    suffix: str = ""

    def wrap(self, text: str) -> str:
        return self.prefix + text + self.suffix


@dataclass(frozen=True)
class TurnFormat:
    """Role-prefixed turns: [system] user assistant user ... <generation prompt>."""

    id: str
    user: Affix
    assistant: Affix
    generation_prompt: str
    stop: tuple[str, ...]
    system: Affix | None = None  # None: the format has no system slot
    no_system: str = ""  # emitted instead of the system block when there is none
    first_user: Affix | None = None  # Llama 2 puts the first user turn inside the opening [INST]
    default_system: str | None = None
    single_turn: bool = False
    controls: tuple[str, ...] = ()
    eos: str | None = None

    def render(self, turns: list[Turn], default_system: str | None = None, strict: bool = True) -> str:
        if not strict:
            return self._render_loosely(turns, default_system)
        system, dialog = split_system(turns)
        offset = len(turns) - len(dialog)
        if system is not None and self.system is None:
            raise GatewayError(400, f"messages[0]: the {self.id} prompt format has no system role.",
                               param="messages[0].role", code="unsupported_message")
        require_alternation(dialog, offset)
        if self.single_turn and len(dialog) > 1:
            raise GatewayError(
                400,
                f"messages[{offset + 1}]: the {self.id} prompt format is single-turn (one instruction, "
                "one response); send the conversation so far inside one user message.",
                param=f"messages[{offset + 1}]", code="unsupported_message")
        system = system if system is not None else (default_system or self.default_system)
        parts = [self.system.wrap(system) if system and self.system else self.no_system]
        for position, turn in enumerate(dialog):
            if turn.role == "assistant":
                parts.append(self.assistant.wrap(turn.content))
            elif position == 0 and self.first_user is not None:
                parts.append(self.first_user.wrap(turn.content))
            else:
                parts.append(self.user.wrap(turn.content))
        parts.append(self.generation_prompt)
        return "".join(parts)

    def _render_loosely(self, turns: list[Turn], default_system: str | None) -> str:
        """Any sequence of turns, each in its role's affixes: what an engine's chat template does for a
        model that has one (the text is only counted then; the engine renders the real prompt)."""
        leading = turns[0].content if turns and turns[0].role == "system" else None
        system = leading if leading is not None else (default_system or self.default_system)
        parts = [self.system.wrap(system) if system and self.system else self.no_system]
        for turn in turns[1:] if leading is not None else turns:
            affix = {"assistant": self.assistant, "system": self.system or self.user}.get(turn.role, self.user)
            parts.append(affix.wrap(turn.content))
        parts.append(self.generation_prompt)
        return "".join(parts)


ALPACA_INTRO = ("Below is an instruction that describes a task. Write a response that appropriately "
                "completes the request.\n\n")
ALPACA_INTRO_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                           "provides further context. Write a response that appropriately completes "
                           "the request.\n\n")


@dataclass(frozen=True)
class AlpacaFormat:
    """Stanford Alpaca's PROMPT_DICT. Single-turn; a system message becomes the instruction and the
    user message its `### Input:` (the with-input variant), the only mapping the format allows."""

    id: str = "alpaca"
    stop: tuple[str, ...] = ("### Instruction:",)
    controls: tuple[str, ...] = ("<s>", "</s>", "### Instruction:", "### Input:", "### Response:")
    eos: str | None = "</s>"

    def render(self, turns: list[Turn], default_system: str | None = None, strict: bool = True) -> str:
        system, dialog = split_system(turns)
        offset = len(turns) - len(dialog)
        require_alternation(dialog, offset)
        if len(dialog) > 1:
            raise GatewayError(400, f"messages[{offset + 1}]: Alpaca is single-turn (one instruction, "
                               "one response).", param=f"messages[{offset + 1}]", code="unsupported_message")
        if system:
            return (ALPACA_INTRO_WITH_INPUT + "### Instruction:\n" + system + "\n\n### Input:\n"
                    + dialog[0].content + "\n\n### Response:")
        return ALPACA_INTRO + "### Instruction:\n" + dialog[0].content + "\n\n### Response:"


@dataclass(frozen=True)
class PlainFormat:
    """FLAN-T5 (and base models that opt in): no roles. One instruction is sent as it is; a
    conversation is flattened into text, since the model knows no turns."""

    id: str
    stop: tuple[str, ...] = ()
    controls: tuple[str, ...] = ()
    eos: str | None = None

    def render(self, turns: list[Turn], default_system: str | None = None, strict: bool = True) -> str:
        system, dialog = split_system(turns)
        require_alternation(dialog, len(turns) - len(dialog))
        head = system + "\n\n" if system else ""
        if len(dialog) == 1:
            return head + dialog[0].content
        lines = [f"{turn.role.capitalize()}: {turn.content}" for turn in dialog]
        return head + "\n".join(lines) + "\nAssistant:"


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                 "gives helpful, detailed, and polite answers to the user's questions.")
GUANACO_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant "
                  "gives helpful, detailed, and polite answers to the user's questions.")
BELUGA_SYSTEM = ("You are Stable Beluga, an AI that follows instructions extremely well. Help as much as "
                 "you can. Remember, be safe, and don't do anything illegal.")
MPT_INSTRUCT_SYSTEM = ("Below is an instruction that describes a task. Write a response that "
                       "appropriately completes the request.")
CHATML = dict(
    system=Affix("<|im_start|>system\n", "<|im_end|>\n"),
    user=Affix("<|im_start|>user\n", "<|im_end|>\n"),
    assistant=Affix("<|im_start|>assistant\n", "<|im_end|>\n"),
    generation_prompt="<|im_start|>assistant\n",
    stop=("<|im_end|>", "<|endoftext|>"),
    controls=("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
)
# Special tokens each tokenizer parses out of plain text: LLaMA's SentencePiece (LLaMA, Llama 2 and
# their fine-tunes), GPT-NeoX's BPE (RedPajama, MPT), Falcon's BPE.
LLAMA_TOKENS = ("<s>", "</s>")
NEOX_TOKENS = ("<|endoftext|>",)
FALCON_TOKENS = ("<|endoftext|>",)

PromptFormat = TurnFormat | AlpacaFormat | PlainFormat

FORMATS: dict[str, PromptFormat] = {f.id: f for f in (
    TurnFormat("llama-2-chat", system=Affix("[INST] <<SYS>>\n", "\n<</SYS>>\n\n"), no_system="[INST] ",
               first_user=Affix("", " "), user=Affix("[INST] ", " "), assistant=Affix("[/INST] ", " </s><s>"),
               generation_prompt="[/INST]", stop=("</s>",), eos="</s>",
               controls=(*LLAMA_TOKENS, "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")),
    TurnFormat("vicuna-v1.1", system=Affix("", " "), default_system=VICUNA_SYSTEM, user=Affix("USER: ", " "),
               assistant=Affix("ASSISTANT: ", "</s>"), generation_prompt="ASSISTANT:", stop=("</s>", "USER:"),
               eos="</s>", controls=(*LLAMA_TOKENS, "USER:", "ASSISTANT:")),
    TurnFormat("guanaco", system=Affix("", " "), default_system=GUANACO_SYSTEM, user=Affix("### Human: "),
               assistant=Affix("### Assistant: "), generation_prompt="### Assistant: ",
               stop=("### Human",), eos="</s>", controls=(*LLAMA_TOKENS, "### Human", "### Assistant")),
    TurnFormat("stable-beluga", system=Affix("### System:\n", "\n\n"), default_system=BELUGA_SYSTEM,
               user=Affix("### User: ", "\n\n"), assistant=Affix("### Assistant:\n", "\n\n"),
               generation_prompt="### Assistant:\n", stop=("### User:",), eos="</s>",
               controls=(*LLAMA_TOKENS, "### System:", "### User:", "### Assistant:")),
    TurnFormat("redpajama-chat", system=Affix("", "\n"), user=Affix("<human>: ", "\n"),
               assistant=Affix("<bot>: ", "\n"), generation_prompt="<bot>:", stop=("<human>",),
               eos="<|endoftext|>", controls=(*NEOX_TOKENS, "<human>:", "<bot>:")),
    # Few-shot Q/A, the style of the RedPajama-INCITE-Instruct card: earlier turns become examples.
    TurnFormat("redpajama-instruct", system=Affix("", "\n"), user=Affix("Q: ", "\n"),
               assistant=Affix("A: ", "\n"), generation_prompt="A:", stop=("\nQ:",),
               eos="<|endoftext|>", controls=(*NEOX_TOKENS, "\nQ:", "\nA:")),
    TurnFormat("falcon-instruct", system=Affix("", "\n\n"), user=Affix("User: ", "\n\n"),
               assistant=Affix("Assistant: ", "\n\n"), generation_prompt="Assistant:", stop=("\nUser:",),
               eos="<|endoftext|>", controls=(*FALCON_TOKENS, "\nUser:", "\nAssistant:")),
    TurnFormat("falcon-180b-chat", system=Affix("System: ", "\n"), user=Affix("User: ", "\n"),
               assistant=Affix("Falcon: ", "\n"), generation_prompt="Falcon:", stop=("\nUser:",),
               eos="<|endoftext|>", controls=(*FALCON_TOKENS, "\nUser:", "\nFalcon:", "\nSystem:")),
    TurnFormat("mpt-chat", **CHATML, eos="<|endoftext|>"),  # GPT-NeoX tokenizer: EOS <|endoftext|>
    TurnFormat("chatml", **CHATML, eos="<|im_end|>"),  # SmolLM2's tokenizer ends turns with <|im_end|>
    TurnFormat("mpt-instruct", system=Affix("", "\n"), default_system=MPT_INSTRUCT_SYSTEM,
               user=Affix("### Instruction:\n", "\n"), assistant=Affix("### Response:\n", "\n"),
               generation_prompt="### Response:\n", stop=("### Instruction",), single_turn=True,
               eos="<|endoftext|>", controls=(*NEOX_TOKENS, "### Instruction", "### Response")),
    # The MPT-30B-Instruct card's own layout differs from 7B's: blank lines, no colons, "###Instruction".
    TurnFormat("mpt-30b-instruct", system=Affix("", "\n\n"), default_system=MPT_INSTRUCT_SYSTEM,
               user=Affix("###Instruction\n", "\n\n"), assistant=Affix("### Response\n", "\n\n"),
               generation_prompt="### Response\n", stop=("###Instruction", "### Instruction"),
               single_turn=True, eos="<|endoftext|>",
               controls=(*NEOX_TOKENS, "###Instruction", "### Instruction", "### Response")),
    AlpacaFormat(),
    PlainFormat("flan-t5", eos="</s>", controls=("</s>", "<pad>", "<unk>", "\nUser:", "\nAssistant:")),
    PlainFormat("none"),
)}
