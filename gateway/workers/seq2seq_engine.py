"""The model side of the seq2seq worker: load a T5 checkpoint, run `generate` in worker threads, and hand
each decoding step to the event loop as text deltas.

Why not `TextIteratorStreamer`: it releases text only at word boundaries (not per token), gives text
without token ids (no per-chunk usage), supports one row only (no `n`), and `generate` calls a streamer
*after* its stopping criteria, so a stop string found there would cost an extra decoding step. Instead a
`StoppingCriteria` sees every new token of every row first: it detokenizes, checks stop strings and the
cancel flag, pushes the deltas to an `asyncio.Queue` with `call_soon_threadsafe`, and tells `generate`
which rows are done. The event loop only ever awaits the queue, so it never blocks on the model.

Sampling is done by our own last logits processor with a per-request `torch.Generator` (greedy
`generate` then picks the one token left): `seed` is then reproducible even while other requests sample
concurrently, which the process-global torch RNG would not allow.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gateway.workers.seq2seq_decode import Delta, TextTracker

log = logging.getLogger("gateway.workers.seq2seq")

# FLAN-T5 must run in bf16 or fp32: T5 >= large overflows to inf/NaN in fp16 (transformers#20287).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # <= 0 -> off (vLLM uses -1)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class End:
    """Last item on a generation's queue; `error` is set when `generate` raised."""

    error: BaseException | None = None


@dataclass
class Generation:
    queue: asyncio.Queue[list[Delta] | End]
    cancel: threading.Event
    tracker: TextTracker


class Engine:
    def __init__(self, model_dir: Path, dtype: str = "float32", max_concurrency: int = 2) -> None:
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        self.model: Any = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).eval()
        config = self.model.config
        self.vocab_size: int = config.vocab_size
        self.eos_id: int = config.eos_token_id
        self.pad_id: int = config.pad_token_id if config.pad_token_id is not None else 0
        # T5 starts decoding from <pad>; a config that names none falls back to it too.
        self.decoder_start_id: int = (config.decoder_start_token_id
                                      if config.decoder_start_token_id is not None else self.pad_id)
        # The encoder was trained on (and the tokenizer declares) 512 tokens for every FLAN-T5 size;
        # tokenizers without a limit report a huge sentinel, then the config's n_positions decides.
        limit = getattr(self.tokenizer, "model_max_length", None)
        if not (isinstance(limit, int) and 0 < limit < 1_000_000):
            limit = getattr(config, "n_positions", None) or 512
        self.max_model_len: int = int(limit)
        self.max_concurrency = max_concurrency
        self._executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="seq2seq-generate")
        self._active = 0
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        """One tiny generation at start-up, so the first client does not pay for lazy initialisation."""
        ids = torch.tensor([self.encode("warm up")])
        with torch.inference_mode():
            self.model.generate(input_ids=ids, generation_config=self._config(SamplingParams(max_tokens=2)))

    def encode(self, text: str) -> list[int]:
        """Encoder input ids, with the `</s>` the tokenizer appends (it counts as a prompt token)."""
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def try_start(self, prompts: list[list[int]], n: int, params: SamplingParams) -> Generation | None:
        """Start generating n rows per prompt in a worker thread, or return None when all slots are busy."""
        with self._lock:
            if self._active >= self.max_concurrency:
                return None
            self._active += 1
        try:
            loop = asyncio.get_running_loop()
            tracker = TextTracker(self.decode, len(prompts) * n, params.max_tokens, params.stop,
                                  eos_ids=(self.eos_id,), stop_token_ids=params.stop_token_ids,
                                  ignore_eos=params.ignore_eos)
            generation = Generation(asyncio.Queue(), threading.Event(), tracker)
            self._executor.submit(self._run, generation, prompts, n, params, loop)
        except BaseException:
            self._release()
            raise
        return generation

    def _release(self) -> None:
        with self._lock:
            self._active -= 1

    def _run(self, generation: Generation, prompts: list[list[int]], n: int, params: SamplingParams,
             loop: asyncio.AbstractEventLoop) -> None:
        def push(item: list[Delta] | End) -> None:
            try:
                loop.call_soon_threadsafe(generation.queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (shutdown): nobody is listening any more
                generation.cancel.set()

        final = End()
        try:
            input_ids, attention_mask = self._batch(prompts, n)
            criteria = _StepCriteria(generation, push)
            with torch.inference_mode():
                self.model.generate(
                    input_ids=input_ids, attention_mask=attention_mask,
                    generation_config=self._config(params),
                    logits_processor=_processors(params, self.eos_id),
                    stopping_criteria=StoppingCriteriaList([criteria]),
                )
            # Rows `generate` ended without our verdict (cancelled): close them so every choice finishes.
            tail = generation.tracker.finish_all("length")
            if tail:
                push(tail)
        except BaseException as exc:  # reported to the client as an error event / 500, never swallowed
            log.exception("generation failed")
            final = End(exc)
        finally:
            # Free the slot before the client can see the end: its next request must not get a 429.
            self._release()
        push(final)

    def _batch(self, prompts: list[list[int]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows prompt-major (row = prompt_index * n + choice), right-padded: vLLM's choice numbering."""
        width = max(len(p) for p in prompts)
        rows = [p + [self.pad_id] * (width - len(p)) for p in prompts for _ in range(n)]
        masks = [[1] * len(p) + [0] * (width - len(p)) for p in prompts for _ in range(n)]
        return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long)

    def _config(self, params: SamplingParams) -> GenerationConfig:
        # do_sample stays False: sampling, when asked for, is our own last logits processor.
        return GenerationConfig(
            max_new_tokens=params.max_tokens,
            min_new_tokens=params.min_tokens or None,
            do_sample=False,
            num_beams=1,
            decoder_start_token_id=self.decoder_start_id,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
        )


class _StepCriteria(StoppingCriteria):
    """Called by `generate` once per step with every row's new token: our hook into the decoding loop."""

    def __init__(self, generation: Generation, push: Callable[[list[Delta]], None]) -> None:
        self._generation = generation
        self._push = push

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        deltas = self._generation.tracker.step(input_ids[:, -1].tolist())
        if deltas:
            self._push(deltas)
        if self._generation.cancel.is_set():  # the client went away: stop every row now
            return torch.ones(input_ids.shape[0], dtype=torch.bool)
        return torch.tensor(self._generation.tracker.done, dtype=torch.bool)


def _processors(params: SamplingParams, eos_id: int) -> LogitsProcessorList:
    # Order as in vLLM: penalties and bias on the raw logits, then temperature, top-k, top-p, sample.
    processors: list[LogitsProcessor] = [_Adjust(params, eos_id)]
    if params.temperature > 0:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        processors.append(_Sample(torch.Generator().manual_seed(seed)))
    return LogitsProcessorList(processors)


class _Adjust(LogitsProcessor):
    """logit_bias, OpenAI's presence/frequency penalties, vLLM's repetition_penalty and ignore_eos."""

    def __init__(self, params: SamplingParams, eos_id: int) -> None:
        self._params = params
        self._eos_id = eos_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        p = self._params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
            scores[:, ids] += torch.tensor(list(p.logit_bias.values()), dtype=scores.dtype)
        generated = input_ids[:, 1:]  # column 0 is the decoder start token, not output
        if (p.presence_penalty or p.frequency_penalty) and generated.shape[1]:
            counts = torch.zeros_like(scores).scatter_add_(
                1, generated, torch.ones(generated.shape, dtype=scores.dtype))
            scores = scores - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(scores.dtype)
        if p.repetition_penalty != 1.0 and generated.shape[1]:
            seen = torch.gather(scores, 1, generated)
            seen = torch.where(seen < 0, seen * p.repetition_penalty, seen / p.repetition_penalty)
            scores = scores.scatter(1, generated, seen)
        if p.ignore_eos:  # keep going to max_tokens: the model may never pick EOS
            scores[:, self._eos_id] = -float("inf")
        return scores


class _Sample(LogitsProcessor):
    """Draw one token per row with this request's generator and leave only it standing for argmax."""

    def __init__(self, generator: torch.Generator) -> None:
        self._generator = generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1)
        chosen = torch.multinomial(probs, 1, generator=self._generator)
        picked = torch.full_like(scores, -float("inf"))
        return picked.scatter_(1, chosen, 0.0)
