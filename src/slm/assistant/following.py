"""How the assistant follows a story request: what the request asks, read from its own words, and the best of
several answers by the checker that scores it.

    plan     constraints.read_request on the newest user message: the words and names it asks for, a first
             or last sentence it gives, and a short or long story, whatever its wording
    prompt   the conversation, then the requested first sentence: the answer starts with it, and the model
             goes on from there as from any opening
    finish   with a requested last sentence, the answer is cut after its last whole sentence and ends with it
    choose   of settings.best_of answers, the one that meets most of what was asked with the fewest flaws
             (constraints.flaws) and reads best: the lowest mean surprise of the model over the answer as a
             plain story, and no word far more surprising than the rest (a forced word is such a spike)

A completion prompt has no request: plan, finish and choose are for chats.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from slm.assistant.constraints import check, flaws, read_request
from slm.data.requests import LONG_WORDS, SHORT_WORDS, sentences
from slm.data.tokenizer import Tokenizer
from slm.inference.engine import Engine, TextDelta, collect, drain
from slm.inference.logit_bias import Length, Words, word_forms
from slm.inference.sampling import SamplingSettings
from slm.model.gpt import GPT

# How choose() weighs a candidate (benchmarks/assistant.md): each constraint met counts 1, a flaw -1, the
# model's mean loss per token -FLUENCY, a spike of surprise past SPIKE nats on one word -SPIKE_WEIGHT per nat,
# the requested words' mean loss past WORD_LOSS nats (a forced word) -WORD_WEIGHT per nat.
FLUENCY, SPIKE, SPIKE_WEIGHT = 0.5, 12.0, 0.1
WORD_LOSS, WORD_WEIGHT = 4.0, 0.15
FLAW_WEIGHTS = {"repeats": 1.0, "glued": 1.0, "miscased": 0.5}


@dataclass(frozen=True)
class Plan:
    """What an answer to one chat must do, and how it starts."""

    constraints: dict[str, Any]
    words: Words  # the requested words' forms, for settings.word_bias
    start_ids: list[int] = field(default_factory=list)  # the requested first sentence's ids, the answer's first
    length: Length | None = None  # chats: a short or long answer, as the gold stories of such requests are

    @property
    def starts(self) -> str:
        return self.constraints.get("starts", "")

    def add_candidate(self, engine: Engine, ids: list[int], settings: SamplingSettings, candidate: int,
                      owner: Any, seed: int | None = None) -> None:
        """Queue the candidate-th answer to the conversation `ids`: the first sentence, then candidate_settings'."""
        engine.add(ids + self.start_ids, candidate_settings(settings, candidate), seed, self.words, owner,
                   written=len(self.start_ids), length=self.length)

    def answered_whole(self, settings: SamplingSettings) -> bool:
        """Whether the answer is known only once it is finished and chosen (best of several, or a requested
        last sentence that closes it), rather than streamed as it comes."""
        return settings.best_of > 1 or "ends" in self.constraints


def candidate_settings(settings: SamplingSettings, candidate: int) -> SamplingSettings:
    """How a request's candidate-th answer decodes. Sampled candidates differ by their draws; greedy ones would
    be the same answer, so candidate c reaches (c + 1) times as far for requested words and penalizes repeats
    (c + 1) times as hard: choose() picks among answers from the model's own words to the requested ones."""
    if settings.temperature > 0 or candidate == 0:
        return settings
    return dataclasses.replace(settings, word_reach=min(settings.word_reach * (candidate + 1), 100.0),
                               dry_multiplier=min(settings.dry_multiplier * (candidate + 1), 100.0))


def plan(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> Plan:
    users = [m["content"] for m in messages if m["role"] == "user"]
    constraints = read_request(users[-1]) if users else {}
    starts, length = constraints.get("starts", ""), constraints.get("length")
    return Plan(constraints, word_forms(tokenizer, constraints.get("words", [])),
                tokenizer.encode(starts) if starts else [],
                {"short": Length(most=SHORT_WORDS), "long": Length(least=LONG_WORDS), None: Length()}[length])


def finish(plan: Plan, text: str) -> str:
    """The answer's whole text from what the model wrote after the plan's first ids: the requested first
    sentence before it, and a requested last sentence at its end, after its last whole sentence."""
    text = plan.starts + text
    ends = plan.constraints.get("ends")
    if not ends:
        return text
    kept = sentences(text)
    if kept and kept[-1][-1:] not in '.!?"\u201d':  # cut off mid-sentence (max tokens)
        kept.pop()
    if kept and kept[-1].strip().casefold() == ends.strip().casefold():
        kept.pop()  # the model wrote it itself
    return " ".join([*kept, ends])


WORD_EDGES = " \n\t\"'\u201c\u201d\u2018\u2019.,!?;:()-"  # around a word as surprise() splits the text


@dataclass(frozen=True)
class Surprise:
    """How a text reads to a model as a plain story (after end-of-text, as a document starts)."""

    mean_loss: float  # per token
    words: list[tuple[str, float]]  # each word as written and its loss, the sum over its tokens

    @property
    def spike(self) -> float:
        """The most surprising word's loss."""
        return max((loss for _, loss in self.words), default=0.0)

    def word_loss(self, wanted: list[str]) -> float | None:
        """The mean loss of the wanted words where the text first writes each (None: it writes none). A word
        forced in where it does not fit costs far more than the same word where a person wrote it."""
        first: dict[str, float] = {}
        for text, loss in self.words:
            first.setdefault(text.strip(WORD_EDGES).casefold(), loss)
        losses = [first[w.casefold()] for w in wanted if w.casefold() in first]
        return sum(losses) / len(losses) if losses else None


@torch.no_grad()
def surprise(model: GPT, tokenizer: Tokenizer, texts: list[str]) -> list[Surprise]:
    """Each text's Surprise under the model. A word starts at a token that does not start with a letter."""
    device = model.transformer.wte.weight.device
    results = []
    for text in texts:
        ids = [tokenizer.eot_id] + tokenizer.encode(text)[:model.config.block_size]
        if len(ids) < 2:
            results.append(Surprise(0.0, []))
            continue
        x = torch.tensor([ids[:-1]], device=device)
        logits = model.lm_head(model.hidden(x))[0].float()
        losses = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:], device=device), reduction="none")
        words: list[list] = []
        for token_id, loss in zip(ids[1:], losses.tolist()):
            piece = tokenizer.decode([token_id])
            if not words or not piece[:1].isalpha():
                words.append(["", 0.0])
            words[-1][0] += piece
            words[-1][1] += loss
        results.append(Surprise(losses.mean().item(), [(text, loss) for text, loss in words]))
    return results


def score(constraints: dict[str, Any], text: str, read: Surprise) -> float:
    """How well a candidate follows its request and how it reads (see the module); higher is better."""
    met = sum(check(constraints, text).values())
    found = flaws(constraints, text)
    penalty = sum(weight * found[key] for key, weight in FLAW_WEIGHTS.items())
    forced = max((read.word_loss(constraints.get("words", [])) or 0.0) - WORD_LOSS, 0.0)
    return met - penalty - FLUENCY * read.mean_loss - SPIKE_WEIGHT * max(read.spike - SPIKE, 0.0) - WORD_WEIGHT * forced


def choose(model: GPT, tokenizer: Tokenizer, plan: Plan, texts: list[str]) -> int:
    """The index of the best of the finished candidate texts."""
    if len(texts) == 1:
        return 0
    scores = [score(plan.constraints, text, read) for text, read in zip(texts, surprise(model, tokenizer, texts))]
    return max(range(len(texts)), key=scores.__getitem__)


def best(model: GPT, tokenizer: Tokenizer, plan: Plan, written: list[str]) -> tuple[int, str]:
    """(index, whole text) of the best candidate, from what each candidate's model wrote (finish, choose)."""
    texts = [finish(plan, text) for text in written]
    index = choose(model, tokenizer, plan, texts)
    return index, texts[index]


def answers(model: GPT, tokenizer: Tokenizer, prompts: list[list[int]], plans: list[Plan],
            settings: SamplingSettings, generator: torch.Generator | None = None) -> list[TextDelta]:
    """The chosen answer to each chat prompt (its conversation's ids), settings.best_of candidates each, all
    decoding as rows of one running batch; each delta holds the whole text and its finish reason."""
    engine = Engine(model, tokenizer, len(prompts) * settings.best_of, generator)
    for index, (ids, chat_plan) in enumerate(zip(prompts, plans)):
        for candidate in range(settings.best_of):
            chat_plan.add_candidate(engine, ids, settings, candidate, (index, candidate))
    whole = collect(drain(engine))
    chosen = []
    for index, chat_plan in enumerate(plans):
        candidates = [whole[(index, c)] for c in range(settings.best_of)]
        kept, text = best(model, tokenizer, chat_plan, [candidate.text for candidate in candidates])
        chosen.append(dataclasses.replace(candidates[kept], row=index, text=text))
    return chosen
