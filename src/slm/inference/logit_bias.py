"""A row's logit bias, added before sampling: the words a request names, pushed in the forms that fit where
the text stands; end-of-text held back or pushed for the length a request asks; and DRY's penalty on ids that
would go on repeating the row's own text.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from slm.data.tokenizer import get_tokenizer

if TYPE_CHECKING:  # sampling.make_picker applies the bias, so the settings' module imports this one
    from slm.inference.sampling import SamplingSettings


@dataclass(frozen=True)
class WordForms:
    """The first ids of a requested word's written forms, by where in the text each fits: mid-sentence after a
    space (" ball"; a name: " Lily"), a sentence's first word (" Ball"), and with no space before it, as after
    a newline or an opening quote ("Ball"). A word never gets a form without a space after a letter: that
    form glues onto the word before ("aTogether"). `rest`: after a form's first id, the ids that finish it
    (" R" -> "oxy"), so that a name of several ids is written whole once begun."""

    word: str
    name: bool
    mid: frozenset[int]
    start: frozenset[int]
    bare: frozenset[int]
    rest: dict[int, tuple[int, ...]]


Words = list[WordForms]  # the requested words of one row


@dataclass(frozen=True)
class Length:
    """How long a row's answer is to be, in words: end-of-text is held back until it has `least`; from half of
    `most` on it is pushed at each sentence end, harder as `most` nears, and past `most` the next sentence end
    ends the answer. Whatever was asked, the same push comes as a budget of room for a story (max_new_tokens of
    2 * BUDGET_PUSH or more) runs out: a story cut short mid-sentence reads worse than one that ends a sentence
    or two early."""

    least: int = 0
    most: int | None = None

    def end_bias(self, words: int, at_sentence_end: bool, tokens_left: int, budget: int) -> float:
        """The bias on end-of-text after `words` words, at a sentence end or not, tokens_left of budget to go."""
        if words < self.least:
            return -FORCE
        if not at_sentence_end:
            return 0.0
        room = budget >= 2 * BUDGET_PUSH  # less: no room for a story, and the caller asked for a cut
        if (room and tokens_left <= BUDGET_END) or (self.most is not None and words >= self.most):
            return FORCE
        by_words = 0.0 if self.most is None else max(words - self.most / 2, 0.0) / (self.most / 2)
        by_budget = max(BUDGET_PUSH - tokens_left, 0) / (BUDGET_PUSH - BUDGET_END) if room else 0.0
        return LENGTH_PUSH * max(by_words, by_budget)


def word_forms(tokenizer: Any, words: list[str]) -> Words:
    """Each word's WordForms. A common word keeps only first ids that hold 3 or more of its letters (all of a
    shorter word): a first id such as " st" would push every word that starts so. A name keeps any first id,
    as its rest follows it."""
    result = []
    for word in words:
        name, capital = word[0].isupper(), word[0].upper() + word[1:]
        rest: dict[int, tuple[int, ...]] = {}

        def first_ids(text: str) -> frozenset[int]:
            ids = tokenizer.encode(text)
            if not name and len(tokenizer.decode(ids[:1]).strip()) < min(3, len(text.strip())):
                return frozenset()
            rest[ids[0]] = tuple(ids[1:])
            return frozenset(ids[:1])

        forms = WordForms(word, name, first_ids(" " + (capital if name else word)), first_ids(" " + capital),
                          first_ids(capital), rest)
        if forms.mid or forms.start or forms.bare:
            result.append(forms)
    return result



# Where a token leaves the text, for the forms of a requested word that fit after it (WordForms).
MID, START, EITHER, BARE = 0, 1, 2, 3
# A push no logit outweighs: the rest of a requested name once its first id is written ("R" then "oxy", never
# "R Emma"), end-of-text past an answer's length, and (negated) what would lengthen a name written whole.
FORCE = 1e4
# The push on end-of-text at a sentence end as a short answer's word limit nears (Length.end_bias), and the
# ids left of a row's budget from which it is pushed, and from which the next sentence end ends the row.
LENGTH_PUSH = 8.0
BUDGET_PUSH, BUDGET_END = 48, 16
# DRY's sequence breakers (llama.cpp's defaults): a repeat is not followed across a newline, colon, quote or star.
DRY_BREAKERS = ("\n", ":", '"', "*")


class TokenTable(NamedTuple):
    """What each id does to the text, by id."""

    where: torch.Tensor  # where it leaves the text: MID, START, EITHER or BARE
    breaks: torch.Tensor  # whether it holds a DRY breaker
    glues: torch.Tensor  # whether it starts with a letter or digit: written after a word, it lengthens it
    opens: list[bool]  # whether it starts a word whatever came before (" ball", '"Hi')
    ends_in_word: list[bool]  # whether it ends inside a word, so that a glued id goes on with that word


_LETTER = re.compile(r"[A-Za-z']")


@functools.lru_cache(maxsize=1)
def token_table(vocab_size: int) -> TokenTable:
    """The TokenTable of the GPT-2 vocabulary, padded to vocab_size."""
    tokenizer = get_tokenizer()
    where = torch.full((vocab_size,), MID, dtype=torch.int8)
    breaks = torch.zeros(vocab_size, dtype=torch.bool)
    glues = torch.zeros(vocab_size, dtype=torch.bool)
    opens, ends_in_word = [False] * vocab_size, [False] * vocab_size
    for i in range(min(vocab_size, tokenizer.vocab_size)):
        text = tokenizer.token_bytes(i).decode("utf-8", errors="replace")
        glues[i] = text[:1].isalnum()
        opens[i] = bool(re.match(r"[^A-Za-z']+[A-Za-z]", text))
        ends_in_word[i] = bool(_LETTER.fullmatch(text[-1:]))
        stripped = text.rstrip(" ")
        if text.endswith(("\n", " ")) or text in (' "', '"', " \u201c", "\u201c"):
            where[i] = BARE  # after a newline, a space or an opening quote, a word starts without its space
        elif stripped.endswith((".", "!", "?")):
            where[i] = START
        elif stripped.endswith(('."', '!"', '?"', ".\u201d", "!\u201d", "?\u201d")):
            where[i] = EITHER  # '"Hi!" said Tom' and '"Hi!" Tom ran.' both follow a closing quote
        breaks[i] = any(b in text for b in DRY_BREAKERS)
    return TokenTable(where, breaks, glues, opens, ends_in_word)


class LogitBias:
    """The (B, V) logit bias of each row, added before sampling: its requested words (word_bias), each in the
    forms that fit where the text stands, end-of-text by its requested length, and DRY's penalty
    (dry_multiplier) on ids that would go on repeating what the row already wrote.

    Words: a word's bias goes once the row writes any of its forms. Names are pushed from the first id, other
    words only once the answer's first sentence has ended (gold stories spread their words; a bias from the
    start stuffs them all into the first sentence), and no form ever follows a letter without a space.
    With word_reach, a word's push applies only where its logit is already within reach of the best id's
    (apply): the word comes where the model finds it plausible, not wherever it is due. The reach widens by
    word_reach with each sentence the row ends, so a word that finds no natural place still comes before the
    story is over, but only where it fits within word_reach as well as at the best spot where it was
    due before: a spot passed by sets the bar, so a word comes where it fits, not at whatever spot is next
    once the reach is wide ("One day, leather sky"; benchmarks/assistant.md, issue 28 part 5). Names are
    pushed regardless (any name fits where a character comes in), a name begun
    is finished whatever the model would write ("R" -> "oxy"), and a name written whole is not lengthened
    ("Toot", never "Tooty"), wherever the row writes it.
    Length: a row's Length holds back or pushes end-of-text by the words written so far.
    DRY ("don't repeat yourself", llama.cpp's sampler): where the row's last n ids, n >= dry_allowed_length,
    also came earlier followed by id x, x's logit drops by dry_multiplier * dry_base ** (n - allowed) for the
    longest such n; a breaker id ends a match."""

    def __init__(self, words: list[Words], settings: SamplingSettings, vocab_size: int, device: torch.device,
                 written: list[list[int]] | None = None, lengths: list[Length | None] | None = None) -> None:
        self.left = [list(row) for row in words]
        self.names = [[(first, *w.rest.get(first, ())) for w in row if w.name for first in w.mid | w.start | w.bare]
                      for row in words]  # each requested name's ids, as each of its forms is written whole
        self.lengths = lengths or [None] * len(words)
        self.settings = settings
        self.table = token_table(vocab_size)
        eot_id = get_tokenizer().eot_id
        self.eot_id = eot_id if eot_id < vocab_size else None
        self.history: list[list[int]] = [[] for _ in words]
        self.finishing: list[tuple[int, ...]] = [() for _ in words]  # the ids that finish a word begun
        self.finishing_name = [False] * len(words)  # a name begun is written whole, whatever the model wants
        self.sentences = [0] * len(words)  # sentence ends the row has written
        self.word_count = [0] * len(words)  # words the row has written
        self.generated = [0] * len(words)  # ids it has picked (a requested first sentence is not among them)
        self.reach = torch.full((len(words), 1), settings.word_reach, device=device)
        self.bias = torch.zeros(len(words), vocab_size, device=device)
        # each id's best fit so far where it was pushed: its logit less the best id's
        self.best_gap = torch.full((len(words), vocab_size), -torch.inf, device=device)
        self.free = torch.zeros(len(words), vocab_size, dtype=torch.bool, device=device)  # pushes never gated
        self.glues = self.table.glues.to(device)
        for row, ids in enumerate(written or []):
            for next_id in ids:
                self._wrote(row, next_id)
        for row in range(len(words)):
            self._reset(row, self.table.where[self.history[row][-1]].item() if self.history[row] else BARE)

    def written(self, next_ids: list[int]) -> None:
        for row, next_id in enumerate(next_ids):
            self.generated[row] += 1
            self._wrote(row, next_id)
            self._reset(row, self.table.where[next_id].item())

    def _wrote(self, row: int, next_id: int) -> None:
        history = self.history[row]
        after_word = bool(history) and self.table.ends_in_word[history[-1]]
        self.word_count[row] += self.table.opens[next_id] or (bool(self.table.glues[next_id]) and not after_word)
        history.append(next_id)
        if self.table.where[next_id].item() in (START, EITHER):
            self.sentences[row] += 1
            self.reach[row] = self.settings.word_reach * max(1, self.sentences[row])
        finishing = self.finishing[row]
        self.finishing[row] = finishing[1:] if finishing[:1] == (next_id,) else ()
        for w in self.left[row]:
            if next_id in w.mid | w.start | w.bare:
                self.finishing[row], self.finishing_name[row] = w.rest.get(next_id, ()), w.name
        self.left[row] = [w for w in self.left[row] if next_id not in w.mid | w.start | w.bare]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) with the bias added; with word_reach, a word's push only where it is within reach."""
        return apply_all([self], logits)

    def _reset(self, row: int, where: int) -> None:
        self.bias[row], self.free[row] = 0, False
        if self.settings.word_bias and self.finishing[row]:
            next_id = self.finishing[row][0]
            self.bias[row, next_id] = FORCE if self.finishing_name[row] else self.settings.word_bias
            self.free[row, next_id] = True
        elif self.settings.word_bias:
            for w in self.left[row]:
                if not (w.name or self.sentences[row]):
                    continue
                forms = {MID: w.mid, START: w.start, EITHER: w.mid | w.start, BARE: w.bare}[where]
                if forms:
                    self.bias[row, list(forms)] = self.settings.word_bias
                    self.free[row, list(forms)] = w.name
        history = self.history[row]
        if (history and self.table.ends_in_word[history[-1]]
                and any(tuple(history[-len(name):]) == name for name in self.names[row])):
            self.bias[row].masked_fill_(self.glues, -FORCE)  # a name written whole: "Toot", never "Tooty"
        length = self.lengths[row]
        if length is not None and self.eot_id is not None:
            budget = self.settings.max_new_tokens
            self.bias[row, self.eot_id] += length.end_bias(self.word_count[row], where in (START, EITHER),
                                                           budget - self.generated[row], budget)
            self.free[row, self.eot_id] = True
        if self.settings.dry_multiplier:
            for next_id, penalty in self._dry(history).items():
                self.bias[row, next_id] -= penalty

    def _dry(self, history: list[int]) -> dict[int, float]:
        """DRY's penalty by the id that would extend a repeat of the row's own text."""
        s = self.settings
        if len(history) < 2 or self.table.breaks[history[-1]]:
            return {}
        ids = torch.tensor(history)
        n = len(history)
        # ends[j]: the earlier positions j whose id is the last id; a repeat of length L ends at j.
        ends = torch.nonzero(ids[:-1] == ids[-1]).flatten()
        length = torch.ones_like(ends)
        alive = torch.ones_like(ends, dtype=torch.bool)
        for k in range(1, n):
            back = ends - k
            alive &= back >= 0
            if not alive.any():
                break
            same = alive & (ids[back.clamp(min=0)] == ids[n - 1 - k]) & ~self.table.breaks[ids[n - 1 - k]]
            length += same
            alive = same
        penalties: dict[int, float] = {}
        for j, matched in zip(ends.tolist(), length.tolist()):
            if matched >= s.dry_allowed_length:
                follower = history[j + 1]
                penalty = s.dry_multiplier * s.dry_base ** (matched - s.dry_allowed_length)
                penalties[follower] = max(penalties.get(follower, 0.0), min(penalty, 1e4))
        return penalties


def apply_all(biases: list[LogitBias], logits: torch.Tensor) -> torch.Tensor:
    """logits (B, V) with each row's bias added, its LogitBias in `biases` (of one sampling, one row each or
    all rows of one), in one pass over the batch."""
    bias = torch.cat([b.bias for b in biases])
    if not biases[0].settings.word_reach:
        return logits + bias
    free, reach = torch.cat([b.free for b in biases]), torch.cat([b.reach for b in biases])
    best = torch.cat([b.best_gap for b in biases])
    gap = logits - logits.max(dim=-1, keepdim=True).values
    gated = (bias > 0) & ~free
    fits = (gap >= -reach) & (gap >= best - biases[0].settings.word_reach)
    best = torch.where(gated, torch.maximum(best, gap), best)
    start = 0
    for b in biases:
        b.best_gap, start = best[start:start + len(b.best_gap)], start + len(b.best_gap)
    return logits + bias.masked_fill(gated & ~fits, 0.0)
