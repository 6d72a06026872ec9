"""Continuous batching: a running batch that sequences join and leave between decoding steps.

`slm serve` keeps one Engine. A request's rows join the running batch at the next step instead of waiting
for a batch to end, and each row keeps its own sampling settings, stop strings, token limit, seed and
requested words; a row that finishes, or whose client has gone, leaves at once and frees its slot. Every
command that turns prompts into text (generate, chat, eval-assistant, training samples) runs on the same
engine through `stream` below, so the serving path is the one every test exercises.

A step (Engine.step):
  1. a sequence whose window is full keeps its newest block_size // 2 ids: they are cached again into its
     slot from position 0 (absolute position embeddings cannot be shifted in place), and it decodes on;
  2. the sequences added since the last step are prefilled, those of one prompt length in one forward
     pass, and their first ids are picked from it;
  3. every other sequence feeds its last id through one forward pass of the whole batch (kv_cache.SlotStep),
     each at its own position.
Ids are picked per group of rows that sample alike: unseeded rows with equal settings share one call on the
engine's generator, each with its own repetition penalty and logit bias (words, length, DRY) where it has
them; a seeded row is picked alone, so its text depends on its own seed and history only, never on what else
is decoding.
A greedy row gets the same ids alone or in any batch, up to the floating-point rounding of batched
matrix products, which the tests check does not change the text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from slm.data.tokenizer import StopText, StreamDecoder, Tokenizer
from slm.errors import SlmError
from slm.inference.kv_cache import SlotCache
from slm.inference.logit_bias import Length, LogitBias, Words, apply_all
from slm.inference.sampling import SamplingSettings, make_generator, make_picker, sample_next
from slm.model.gpt import GPT


@dataclass(frozen=True)
class TextDelta:
    """New text of one row of a batch. A row's last delta has a finish_reason: "stop" (end-of-text or a stop
    string) or "length" (max_new_tokens reached); every row gets exactly one such delta."""

    row: int
    text: str
    tokens: int  # ids the row has generated so far, end-of-text and stop strings included
    finish_reason: str | None = None


class RowText:
    """One row's ids as text deltas. The row finishes at end-of-text (not part of its text), at a stop string
    (nor is that) or after settings.max_new_tokens ids; a character split across ids waits for its last."""

    def __init__(self, tokenizer: Tokenizer, settings: SamplingSettings) -> None:
        self.eot_id, self.max_new_tokens = tokenizer.eot_id, settings.max_new_tokens
        self.decoder, self.text = StreamDecoder(tokenizer), StopText(settings.stop)
        self.finished = False

    def add(self, row: int, next_id: int, tokens: int) -> TextDelta | None:
        """The delta for the row's next id, its `tokens`-th; None when it adds no text and does not finish
        the row."""
        eot = next_id == self.eot_id
        final = eot or tokens == self.max_new_tokens
        piece = "" if eot else self.decoder.add(next_id)
        text, stopped = self.text.add(piece + (self.decoder.flush() if final else ""), final)
        reason = "stop" if eot or stopped else "length" if final else None
        self.finished = reason is not None
        return TextDelta(row, text, tokens, reason) if text or reason else None


Pick = Callable[[torch.Tensor, list["Sequence"]], torch.Tensor]  # rows' hidden states (B, C), the rows -> ids (B,)


@dataclass(frozen=True, eq=False)
class SharedPick:
    """The picker of unseeded rows that sample alike, each with its own repetition penalty and logit bias:
    one head and one draw for all of them (best-of-N candidates pick together)."""

    model: GPT
    settings: SamplingSettings
    generator: torch.Generator

    def __call__(self, hidden: torch.Tensor, rows: list[Sequence]) -> torch.Tensor:
        logits = self.model.lm_head(hidden)
        if rows[0].pushed is not None:
            logits = apply_all([row.pushed for row in rows], logits)
        seen = torch.cat([row.seen for row in rows]) if rows[0].seen is not None else None
        return sample_next(logits, self.settings, self.generator, seen)


@dataclass(eq=False)
class Sequence:
    """One row of the running batch: its context, how it picks, and its text so far."""

    context: list[int]  # the ids its cache holds, then next_id: the prompt's last block_size ids and new ones
    settings: SamplingSettings
    text: RowText | None  # None for ids alone (generate.decode): the row ends after max_new_tokens
    owner: Any  # what the caller ties the row to (slm serve: the request and the choice)
    pick: Pick | None = None  # rows with the same picker are picked in one call
    seen: torch.Tensor | None = None  # (1, V): ids of its prompt and output, for the repetition penalty
    pushed: LogitBias | None = None  # its requested words' and DRY's logit bias
    cached: int = 0  # ids of `context` in its slot; 0 until prefilled
    next_id: int | None = None  # picked, not yet fed
    generated: int = 0  # ids picked so far, end-of-text and stop strings included

    @property
    def finished(self) -> bool:
        return self.text.finished if self.text else self.generated == self.settings.max_new_tokens


@dataclass
class Engine:
    """Up to max_rows sequences decoding together over one SlotCache; rows[i] holds slot i."""

    model: GPT
    tokenizer: Tokenizer | None  # None: rows of ids alone, no text
    max_rows: int
    generator: torch.Generator | None = None  # the unseeded rows' draws; None: seeded from the OS
    rows: list[Sequence] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.device = self.model.transformer.wte.weight.device
        self.cache = SlotCache(self.model, self.max_rows)
        self.generator = self.generator or make_generator(self.device, None)
        self.shared_pickers: dict[tuple[SamplingSettings, bool, bool], Pick] = {}

    def add(self, prompt: list[int], settings: SamplingSettings, seed: int | None = None,
            words: Words | None = None, owner: Any = None, written: int = 0,
            length: Length | None = None) -> Sequence:
        """Queue a sequence for the next step (SlmError for bad settings or an empty prompt). A prompt longer
        than the context keeps its end. The prompt's last `written` ids are the answer's own first ids (a
        requested first sentence): the word bias and DRY count them as written. `length`: the answer's requested
        length in words (logit_bias.Length)."""
        settings.check(self.model.config.vocab_size)
        if not prompt:
            raise SlmError("every prompt needs at least one token; end-of-text alone starts a new document")
        if len(self.rows) == self.max_rows:
            raise ValueError(f"the running batch is full ({self.max_rows} rows)")
        text = RowText(self.tokenizer, settings) if self.tokenizer else None
        row = Sequence(prompt[-self.model.config.block_size:], settings, text, owner)
        vocab_size = self.model.config.vocab_size
        if settings.repetition_penalty != 1:
            row.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=self.device)
            row.seen[0, prompt] = True
        if (words and settings.word_bias) or settings.dry_multiplier or length:
            row.pushed = LogitBias([words or []], settings, vocab_size, self.device,
                                   [prompt[len(prompt) - written:]] if written else None, [length])
        sampling = dataclasses.replace(settings, max_new_tokens=1, stop=())  # where a row ends is not picking
        key = (sampling, row.seen is not None, row.pushed is not None)
        if seed is not None:  # a picker of its own
            row.pick = self._picker(key, make_generator(self.device, seed))
        else:  # the engine's, shared by every unseeded row that samples alike
            if key not in self.shared_pickers:
                self.shared_pickers[key] = self._picker(key, self.generator)
            row.pick = self.shared_pickers[key]
        self.rows.append(row)
        return row

    def _picker(self, key: tuple[SamplingSettings, bool, bool], generator: torch.Generator) -> Pick:
        """The picker of rows that sample as key[0], with a repetition penalty (key[1]) or a logit bias (key[2])."""
        if key[1] or key[2]:
            return SharedPick(self.model, key[0], generator)
        plain = make_picker(self.model, key[0], generator, None)
        return lambda hidden, rows: plain(hidden)

    def remove(self, row: Sequence) -> None:
        """Take a row out of the batch between steps; the last row moves into its slot."""
        slot, last = self.rows.index(row), self.rows[-1]
        if last is not row:
            self.cache.move(len(self.rows) - 1, slot, last.cached)
            self.rows[slot] = last
        self.rows.pop()

    @torch.no_grad()
    def step(self) -> list[tuple[Sequence, TextDelta]]:
        """One step of every row (see the module); finished rows leave. Returns each new delta with its row."""
        block_size = self.model.config.block_size
        for row in self.rows:
            if row.cached == block_size:  # the window is full: it keeps its newest half, next_id included
                row.context = row.context[-max(block_size // 2 - 1, 1):]
                self._prefill([row], len(row.context))
        decoding = self._decoding_first()
        new = self.rows[len(decoding):]
        hidden = []
        if decoding:  # slots 0..len(decoding)-1: new rows were appended after them
            ids = torch.tensor([[row.next_id] for row in decoding], device=self.device)
            step = self.cache.step([row.cached for row in decoding])
            hidden.append(self.model.hidden(ids, kv_cache=step)[:, -1])
            for row in decoding:
                row.context.append(row.next_id)
                row.cached += 1
        for length in sorted({len(row.context) for row in new}):
            same = [row for row in new if len(row.context) == length]
            hidden.append(self._prefill(same, length))
        if not hidden:
            return []
        ordered = decoding + sorted(new, key=lambda row: len(row.context))
        next_ids = self._pick(ordered, hidden[0] if len(hidden) == 1 else torch.cat(hidden)).tolist()
        deltas = []
        for row, next_id in zip(ordered, next_ids):
            row.next_id = next_id
            row.generated += 1
            if row.seen is not None:
                row.seen[0, next_id] = True
            if row.pushed is not None:
                row.pushed.written([next_id])
            if row.text and (delta := row.text.add(0, next_id, row.generated)):
                deltas.append((row, delta))
        for row in [row for row in self.rows if row.finished]:
            self.remove(row)
        return deltas

    def _decoding_first(self) -> list[Sequence]:
        """The rows already prefilled, moved to slots 0..n-1 ahead of the new ones (a removal can move a new
        row before them), so one step reads a slice of the cache."""
        decoding = [row for row in self.rows if row.cached]
        for slot, row in enumerate(decoding):
            if self.rows[slot] is not row:  # rows only move down, into a new row's slot or one already moved
                self.cache.move(self.rows.index(row), slot, row.cached)
        self.rows = decoding + [row for row in self.rows if not row.cached]
        return decoding

    def _prefill(self, rows: list[Sequence], length: int) -> torch.Tensor:
        """Cache the contexts of these rows, all `length` ids, into their slots; the last position's hidden
        state of each (len(rows), C)."""
        for row in rows:
            row.cached = length
        ids = torch.tensor([row.context for row in rows], device=self.device)
        prefill = self.cache.prefill([self.rows.index(row) for row in rows])
        return self.model.hidden(ids, kv_cache=prefill)[:, -1]

    def _pick(self, rows: list[Sequence], hidden: torch.Tensor) -> torch.Tensor:
        """The next id of each row from its hidden state (len(rows), C), a call per group that samples alike."""
        groups: dict[Pick, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.pick, []).append(i)
        if len(groups) == 1:  # the common case: no gather, no scatter
            (pick, _), = groups.items()
            return pick(hidden, rows)
        next_ids = torch.empty(len(rows), dtype=torch.long, device=self.device)
        for pick, members in groups.items():
            at = torch.tensor(members, device=self.device)
            next_ids[at] = pick(hidden[at], [rows[i] for i in members])
        return next_ids


def stream(model: GPT, tokenizer: Tokenizer, prompts: list[list[int]], settings: SamplingSettings,
           generator: torch.Generator | None = None, words: list[Words] | None = None,
           written: int = 0, lengths: list[Length | None] | None = None) -> Iterator[TextDelta]:
    """Text deltas of every row (its index in prompts) as its ids arrive, until each row has finished: at
    end-of-text (not part of its text), at a stop string (nor is that) or after max_new_tokens ids. The
    rows share `generator`; each prompt's last `written` ids are its answer's own, `lengths` the requested
    length of each (Engine.add). The settings and prompts are checked on the call (SlmError), before
    anything is generated."""
    engine = Engine(model, tokenizer, len(prompts), generator)
    for row, ids in enumerate(prompts):
        engine.add(ids, settings, words=words[row] if words else None, owner=row, written=written,
                   length=lengths[row] if lengths else None)
    return drain(engine)


def drain(engine: Engine) -> Iterator[TextDelta]:
    """The engine's deltas until every row has finished, each with its row's owner as its row."""
    while engine.rows:
        for row, delta in engine.step():
            yield dataclasses.replace(delta, row=row.owner)


def collect(deltas: Iterator[TextDelta]) -> dict[Any, TextDelta]:
    """Each row's whole text, with the generated ids and finish reason of its last delta, by its row."""
    whole: dict[Any, TextDelta] = {}
    for delta in deltas:
        before = whole[delta.row].text if delta.row in whole else ""
        whole[delta.row] = dataclasses.replace(delta, text=before + delta.text)
    return whole


def complete(model: GPT, tokenizer: Tokenizer, prompts: list[list[int]], settings: SamplingSettings,
             generator: torch.Generator | None = None, words: list[Words] | None = None) -> list[TextDelta]:
    """Each row's whole text, generated ids and finish reason: `stream`'s deltas added up."""
    whole = collect(stream(model, tokenizer, prompts, settings, generator, words))
    return [whole[row] for row in range(len(prompts))]
