"""Generated token ids -> streamed text deltas, with stop strings, EOS and max_tokens, one row per choice.

Pure Python (no torch), so the rules are easy to read: this is vLLM's detokenizer + stop checker in small.
Every generated token yields exactly one `Delta` (possibly with empty text), so a stream carries one chunk
per completion token, the way vLLM streams; the `usage` a client sums from chunks matches the server's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Decode = Callable[[list[int]], str]


@dataclass(frozen=True)
class Delta:
    row: int
    text: str
    finish_reason: str | None = None  # "stop" | "length" | None while the row is still generating
    stop_reason: str | int | None = None  # the stop string or stop token id that ended the row


@dataclass
class _Row:
    ids: list[int] = field(default_factory=list)
    text: str = ""  # everything decoded so far (cut at a stop string once one is found)
    # Incremental detokenization (vLLM's): decode only a window of recent ids each step.
    prefix_offset: int = 0
    read_offset: int = 0
    sent: int = 0  # how many characters of `text` have been handed out
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class TextTracker:
    """Turns one decoding step (a new token per row) into deltas, and knows which rows are done."""

    def __init__(
        self,
        decode: Decode,
        rows: int,
        max_tokens: int,
        stop: Sequence[str] = (),
        eos_ids: Sequence[int] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
    ) -> None:
        self._decode = decode
        self._rows = [_Row() for _ in range(rows)]
        self._max_tokens = max_tokens
        self._stop = [s for s in stop if s]
        self._eos_ids = set() if ignore_eos else set(eos_ids)
        self._stop_token_ids = set(stop_token_ids)
        # A stream must not show the start of a stop string that may complete on a later token, so the
        # last len(longest stop) - 1 characters wait until they are known not to begin one (as in vLLM).
        self._holdback = max((len(s) for s in self._stop), default=1) - 1

    @property
    def done(self) -> list[bool]:
        return [row.finish_reason is not None for row in self._rows]

    def tokens(self, row: int) -> int:
        return len(self._rows[row].ids)

    def text(self, row: int) -> str:
        return self._rows[row].text

    def step(self, new_ids: Sequence[int]) -> list[Delta]:
        """One new token per row (finished rows' padding is ignored)."""
        deltas = []
        for index, token in enumerate(new_ids):
            row = self._rows[index]
            if row.finish_reason is None:
                deltas.append(self._advance(index, row, int(token)))
        return deltas

    def finish_all(self, reason: str) -> list[Delta]:
        """End every unfinished row (generation ended without a per-row verdict), flushing held text."""
        deltas = []
        for index, row in enumerate(self._rows):
            if row.finish_reason is None:
                row.finish_reason = reason
                deltas.append(Delta(index, self._flush(row), reason))
        return deltas

    def _advance(self, index: int, row: _Row, token: int) -> Delta:
        row.ids.append(token)
        if token in self._eos_ids:
            row.finish_reason = "stop"
        elif token in self._stop_token_ids:
            row.finish_reason, row.stop_reason = "stop", token
        else:
            self._update_text(row)
            if row.finish_reason is None and len(row.ids) >= self._max_tokens:
                row.finish_reason = "length"
        if row.finish_reason is not None:
            return Delta(index, self._flush(row), row.finish_reason, row.stop_reason)
        # Hold back what could be the start of a stop string.
        visible = len(row.text) - self._holdback
        upto = max(row.sent, visible)
        delta, row.sent = row.text[row.sent:upto], upto
        return Delta(index, delta)

    def _update_text(self, row: _Row) -> None:
        previous = len(row.text)
        row.text += self._new_text(row)
        # Only the new tail (plus the overlap a stop string could straddle) needs searching.
        hits = []
        for stop in self._stop:
            position = row.text.find(stop, max(0, previous - len(stop) + 1))
            if position >= 0:
                hits.append((position, stop))
        if hits:
            position, stop = min(hits)
            row.text = row.text[:position]
            row.finish_reason, row.stop_reason = "stop", stop

    def _new_text(self, row: _Row) -> str:
        """The text the newest token adds. Decoding from `prefix_offset` (a token or so back) rather
        than from the start keeps each step cheap, and decoding the same window with and without the
        new ids keeps word-start spaces right (SentencePiece drops the space of a window's first piece).
        Text that ends in an incomplete UTF-8 sequence (U+FFFD) waits for the next token."""
        prefix = self._decode(row.ids[row.prefix_offset:row.read_offset])
        text = self._decode(row.ids[row.prefix_offset:])
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        row.prefix_offset, row.read_offset = row.read_offset, len(row.ids)
        return text[len(prefix):]

    @staticmethod
    def _flush(row: _Row) -> str:
        # A stop string may have cut the text below what was already sent only if holdback failed;
        # never hand out negative deltas.
        delta = row.text[row.sent:] if len(row.text) > row.sent else ""
        row.sent = max(row.sent, len(row.text))
        return delta
