#!/usr/bin/env python3
"""Build tiny random-weight checkpoints (plus locally trained tokenizers) for engine tests.

No model hub is reachable, so every checkpoint the tests serve is made here, deterministically:
seeded weights and a tokenizer trained on text generated from a fixed word list and a seeded RNG.

    python tests/support/make_test_models.py --out DIR [--only NAME ...]

Each model lands in DIR/<name>/ with a `.complete` marker holding RECIPE_VERSION; a model whose
marker matches is skipped, so the script is cheap to call from test setup. Runs under the python of
either vLLM venv (torch + transformers + tokenizers).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Bump whenever anything below changes what lands on disk: stale outputs are then rebuilt.
RECIPE_VERSION = "tiny-models-v3"
VOCAB = 512

# Meta's Llama-2-chat format (generation.py), as its HF repos ship it:
# "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST]".
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

WORDS = (
    "the a an and or but if then because while when where what which who how why not no yes "
    "is are was were be been being have has had do does did will would can could should may might "
    "I you he she it we they me him her us them my your his its our their this that these those "
    "time year day week hour minute people man woman child world life hand part place case point "
    "government company number group problem fact water room money story month book eye job word "
    "business issue side kind head house service friend father mother power game line end member "
    "city community name president team minute idea body information back parent face others level "
    "office door health person art war history party result change morning reason research girl guy "
    "model server request token stream engine gateway queue cache memory answer question prompt "
    "good new first last long great little own other old right big high different small large next "
    "early young important few public bad same able quickly slowly always never often really very "
    "say get make go know take see come think look want give use find tell ask work seem feel try "
    "leave call run write read send stop start wait open close build serve count learn speak hello"
).split()


def corpus(lines: int = 4000, seed: int = 1234) -> list[str]:
    """English-like sentences (words, punctuation, numbers) so the tokenizers learn useful merges."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 16))]
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 2025)))
        if rng.random() < 0.3:
            words[rng.randrange(len(words))] += ","
        text = " ".join(words)
        out.append(text[0].upper() + text[1:] + rng.choice(".?!.:"))
    return out


def bpe_tokenizer(specials: list[str]) -> Tokenizer:
    """Byte-level BPE (GPT-2 style): every byte is in the alphabet, so no input is ever unknown."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def unigram_tokenizer() -> Tokenizer:
    """SentencePiece-like Unigram as T5 uses: <pad>=0 (also decoder start), </s>=1, <unk>=2."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok = canonical_unigram(tok, n_special=3)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return tok


def canonical_unigram(tok: Tokenizer, n_special: int) -> Tokenizer:
    """The Unigram trainer is not reproducible: its parallel EM sums differ in the last digits and
    the characters it must keep (appended at the end with tiny score steps) come in hash-set order.
    Round the scores (single characters coarsely, so those steps vanish) and sort, for a stable file."""
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    pieces = [(p, round(s, 1 if len(p) == 1 else 6)) for p, s in vocab[n_special:]]
    data["model"]["vocab"] = vocab[:n_special] + sorted(pieces, key=lambda ps: (-ps[1], ps[0]))
    return Tokenizer.from_str(json.dumps(data))


def fast_tokenizer(tok: Tokenizer, **special: str) -> transformers.PreTrainedTokenizerFast:
    # The generic class (not LlamaTokenizerFast etc.) keeps our post-processor exactly as set here.
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **special)


def printable_greedy_output(model: transformers.PreTrainedModel,
                            tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    """Random weights pick tokens blindly: byte-level BPE then emits control bytes and split UTF-8
    (empty stream deltas, U+FFFD), T5 emits <pad>, and EOS ends replies at random. Zeroing those
    tokens' output rows gives them logit 0, below the best random logit, so greedy (temperature 0)
    output is printable ASCII and always runs to max_tokens (finish_reason "length"). Falcon and MPT
    tie input and output embeddings, so there those tokens also read as zero vectors: harmless."""
    bad = [i for i in range(len(tokenizer)) if i in tokenizer.all_special_ids
           or not (text := tokenizer.decode([i])) or not (text.isascii() and text.isprintable())]
    with torch.no_grad():
        model.get_output_embeddings().weight[bad] = 0.0


def save(model: transformers.PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerBase, out: Path,
         tokenizer_class: str = "PreTrainedTokenizerFast", dtype: torch.dtype = torch.bfloat16) -> None:
    printable_greedy_output(model, tokenizer)
    model.to(dtype).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # transformers 5 writes tokenizer_class "TokenizersBackend" and a list for extra_special_tokens,
    # neither of which 4.x (still allowed for the T5 worker) can load; 5.x reads the 4.x names too.
    # It also writes the chat template only to chat_template.jinja, which 4.x and older vLLM miss.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = tokenizer_class
    if not cfg.get("extra_special_tokens"):
        cfg.pop("extra_special_tokens", None)
    if template := getattr(tokenizer, "chat_template", None):
        cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def build_llama(out: Path) -> None:
    tok = bpe_tokenizer(["<unk>", "<s>", "</s>"])
    bos = tok.token_to_id("<s>")
    # Llama adds BOS to every encoded prompt; the chat template writes its own <s>, and vLLM
    # tokenizes rendered chats without special tokens, so BOS is never doubled.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tokenizer = fast_tokenizer(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64,  # head_dim 16 crashes vLLM CPU attention
        max_position_embeddings=512, bos_token_id=bos, eos_token_id=tok.token_to_id("</s>"),
        tie_word_embeddings=False,
    )
    save(transformers.LlamaForCausalLM(cfg), tokenizer, out)


def eot_tokenizer() -> tuple[transformers.PreTrainedTokenizerFast, int]:
    tok = bpe_tokenizer(["<|endoftext|>"])
    eot = "<|endoftext|>"
    return fast_tokenizer(tok, bos_token=eot, eos_token=eot, unk_token=eot), tok.token_to_id(eot)


def build_gpt_neox(out: Path) -> None:
    tokenizer, eot = eot_tokenizer()
    cfg = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, rotary_pct=0.25, max_position_embeddings=512,
        bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=False,
    )
    save(transformers.GPTNeoXForCausalLM(cfg), tokenizer, out)


def build_falcon(out: Path) -> None:
    tokenizer, eot = eot_tokenizer()
    # Falcon-7B layout: one shared K/V head, attention and MLP in parallel, no biases, rotary.
    cfg = transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
        multi_query=True, parallel_attn=True, bias=False, new_decoder_architecture=False, alibi=False,
        max_position_embeddings=512, bos_token_id=eot, eos_token_id=eot,
    )  # no ffn_hidden_size: vLLM's Falcon hard-codes the MLP at 4 * hidden_size (512)
    save(transformers.FalconForCausalLM(cfg), tokenizer, out)


def build_mpt(out: Path) -> None:
    tokenizer, eot = eot_tokenizer()
    cfg = transformers.MptConfig(
        vocab_size=VOCAB, d_model=128, n_heads=2, n_layers=2, expansion_ratio=2, max_seq_len=512,
        attn_config={"alibi": True}, bos_token_id=eot, eos_token_id=eot,
    )
    save(transformers.MptForCausalLM(cfg), tokenizer, out)


def build_t5(out: Path) -> None:
    tokenizer = transformers.T5TokenizerFast(
        tokenizer_object=unigram_tokenizer(), extra_ids=0, model_max_length=512,
        pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
        num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,  # T5 starts decoding at pad
        tie_word_embeddings=False,  # so zeroing <pad>'s output row keeps the decoder-start embedding
    )
    # float32: the Transformers worker runs T5 on CPU where fp32 is the safe default.
    save(transformers.T5ForConditionalGeneration(cfg), tokenizer, out, "T5TokenizerFast", torch.float32)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-llama": build_llama,
    "tiny-gpt-neox": build_gpt_neox,
    "tiny-falcon": build_falcon,
    "tiny-mpt": build_mpt,
    "tiny-t5": build_t5,
}


def up_to_date(folder: Path) -> bool:
    marker = folder / ".complete"
    return marker.is_file() and marker.read_text().strip() == RECIPE_VERSION


def build(name: str, root: Path) -> str:
    out = root / name
    if up_to_date(out):
        return "skipped"
    # Build in a private scratch folder and move it into place, so a crash never leaves a
    # half-written model and two test sessions building at once do not mix files.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model folder should not be
    try:
        torch.manual_seed(0)
        BUILDERS[name](tmp)
        (tmp / ".complete").write_text(RECIPE_VERSION + "\n")  # written last: marks a finished build
        if not up_to_date(out):  # another process may have finished first
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return "built"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to create the models in")
    parser.add_argument("--only", nargs="+", choices=sorted(BUILDERS), help="build only these models")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    transformers.utils.logging.disable_progress_bar()  # keep output to one line per model
    for name in args.only or list(BUILDERS):
        start = time.monotonic()
        status = build(name, args.out)
        print(f"{status} {name} {time.monotonic() - start:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
