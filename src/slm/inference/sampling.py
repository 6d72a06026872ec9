"""How the next id is picked: the sampling settings every command shares, the filters (repetition penalty,
temperature, top-k, top-p) as pure functions on logits, and the pickers that turn the last position's hidden
state into next ids. A compact head samples its class, then the id (CompactSampler), without building
50,257 logits. A row's requested words and DRY's penalty change its logits first (logit_bias.LogitBias).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from slm.errors import SlmError
from slm.inference.logit_bias import LogitBias
from slm.model.gpt import GPT, CompactHead
from slm.runs.files import SAMPLING_FILE

MAX_NEW_TOKENS = 100_000
MAX_BEST_OF = 16
# The least temperature, top_p and repetition_penalty above 0: logits divided by less overflow float32 to inf,
# and a top_p below float32's least number rounds to 0, either way a NaN distribution and a failed step.
MIN_SAMPLING = 1e-6
TOP_P_CANDIDATES = 256  # top_p_filter looks for the nucleus among these first
# The sampling defaults of every command (generate, chat, eval-assistant's --max-new-tokens, training's
# samples). SamplingSettings' own temperature stays 1, the model's plain distribution, for library callers.
DEFAULT_TEMPERATURE = 0.8  # a little sharper than the model's own distribution: fewer stray words
DEFAULT_MAX_NEW_TOKENS = 256  # room for a whole story: the demo corpus's are 110 to 250 tokens
# The sampling flags of generate, chat and eval-assistant, declared once: field -> (type, help); OFF: no effect.
FLAGS = {"temperature": (float, "0 = greedy; higher = more random"),
         "top_k": (int, "sample only among the k most likely ids"),
         "top_p": (float, "sample only among the most likely ids whose probability reaches p"),
         "repetition_penalty": (float, "above 1, ids already in the prompt or the output get less likely"),
         "word_bias": (float, "added to the logits of the words a request names until the answer uses each"),
         "word_reach": (float, "push a requested word only where its logit is within this much of the best"),
         "dry_multiplier": (float, "DRY: ids that would go on repeating the answer's own text lose this much of "
                            "their logit, growing with the repeat's length"),
         "best_of": (int, "answers decoded per request, of which the one that best follows it is kept")}
OFF = {"top_p": (1, "all"), "repetition_penalty": (1, "none"), "word_reach": (0, "everywhere"),
       "dry_multiplier": (0, "none")}


def add_sampling_flags(p: argparse.ArgumentParser, defaults: dict[str, float | None], from_run: bool = False) -> None:
    """--FIELD for each field of `defaults`, defaulting to its value; with `from_run`, a flag left out is None,
    and the run's sampling.json decides before that value."""
    for name, default in defaults.items():
        kind, what = FLAGS[name]
        off, means = OFF.get(name, (None, ""))
        said = "" if default is None else f"{default:g}" + (f", {means}" if default == off else "")
        where = "the run's sampling.json, else " if from_run else ""
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None if from_run else default,
                       help=what + (f" (default: {where}{said})" if said else ""))


@dataclass(frozen=True)
class SamplingSettings:
    """How each next id is picked and when a row ends. `check` is the one place they are validated."""

    temperature: float = 1.0  # 0 is greedy; above 1 flattens the distribution, below 1 sharpens it
    top_k: int | None = None  # sample among the k most likely ids only (exactly k, even with ties)
    top_p: float = 1.0  # nucleus: the smallest set of most likely ids whose probability reaches top_p
    repetition_penalty: float = 1.0  # CTRL: above 1, ids already in the prompt or the output get less likely
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop: tuple[str, ...] = ()  # a row ends when its text contains one of these; its text ends before it
    # added to the logit of each word a request names (its first id, in the forms that fit) until the row writes it
    word_bias: float = 0.0
    # above 0, a requested word is pushed only where its logit is within word_reach (times the sentences ended so
    # far) of the best id's: where the model finds it plausible, not anywhere ("a day of became"); 0: everywhere
    word_reach: float = 0.0
    # DRY (llama.cpp's): ids that would extend a repeat of n >= dry_allowed_length of the row's own ids lose
    # dry_multiplier * dry_base ** (n - dry_allowed_length) of their logit; 0 turns it off
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    # chats: answers decoded per request, of which the assistant keeps the one that best follows it (following.py)
    best_of: int = 1

    def __post_init__(self) -> None:
        if self.temperature == 0 and not (self.word_reach or self.dry_multiplier):
            object.__setattr__(self, "best_of", 1)  # greedy candidates would all be the same answer (following.py)

    def check(self, vocab_size: int) -> None:
        """Raise SlmError naming the flag of the first bad value. `not x >= 0` rather than `x < 0` refuses NaN."""
        if not (self.temperature == 0 or self.temperature >= MIN_SAMPLING):
            raise SlmError(f"--temperature must be 0 (greedy) or at least {MIN_SAMPLING:f} (got {self.temperature})")
        if self.top_k is not None and not 1 <= self.top_k <= vocab_size:
            raise SlmError(f"--top-k must be between 1 and {vocab_size} (got {self.top_k}); omit it to sample all ids")
        if not MIN_SAMPLING <= self.top_p <= 1:
            raise SlmError(f"--top-p must be between {MIN_SAMPLING:f} and 1 (got {self.top_p}); use 1 to keep every id")
        if not self.repetition_penalty >= MIN_SAMPLING:
            raise SlmError(f"--repetition-penalty must be at least {MIN_SAMPLING:f} (got {self.repetition_penalty}); "
                           "use 1 for none")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise SlmError(f"--max-new-tokens must be between 1 and {MAX_NEW_TOKENS} (got {self.max_new_tokens})")
        for name, off in (("word_bias", "none"), ("word_reach", "everywhere"), ("dry_multiplier", "none")):
            if not 0 <= getattr(self, name) <= 100:
                raise SlmError(f"--{name.replace('_', '-')} must be between 0 and 100 (got {getattr(self, name)}); "
                               f"use 0 for {off}")
        if not 1 < self.dry_base <= 10:
            raise SlmError(f"--dry-base must be above 1 and at most 10 (got {self.dry_base})")
        if not 1 <= self.dry_allowed_length <= 100:
            raise SlmError(f"--dry-allowed-length must be between 1 and 100 (got {self.dry_allowed_length})")
        if not 1 <= self.best_of <= MAX_BEST_OF:
            raise SlmError(f"--best-of must be between 1 and {MAX_BEST_OF} (got {self.best_of})")
        if "" in self.stop:
            raise SlmError("--stop must not be empty: every text contains the empty string")


# The settings a run's sampling.json may choose: how it picks, not how long it writes or where it stops.
RUN_SAMPLING = ("temperature", "top_p", "repetition_penalty", "word_bias", "word_reach", "dry_multiplier", "best_of")


def read_sampling(run: str | Path) -> dict[str, float]:
    """RUN/sampling.json: the sampling a run is served with by default (`slm run assistant` writes the measured
    choice there), held to SamplingSettings.check's bounds; {} when the run has none. A flag or a request's own
    value wins over it."""
    path = Path(run) / SAMPLING_FILE
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(values, dict) or not set(values) <= set(RUN_SAMPLING):
            raise ValueError(f"keys must be some of {', '.join(RUN_SAMPLING)}")
        if bad := [k for k, v in values.items() if type(v) not in (int, float) or k == "best_of" and v != int(v)]:
            raise ValueError(f"{bad[0]} must be a number" + (", a whole one" if bad[0] == "best_of" else ""))
        chosen = {key: int(value) if key == "best_of" else float(value) for key, value in values.items()}
        SamplingSettings(**chosen).check(vocab_size=1)  # top_k, the one bound by the vocabulary, is not here
    except (ValueError, SlmError) as err:
        raise SlmError(f"{path} is not valid ({err}); fix or delete it") from None
    return chosen


# ---- sampling filters: pure functions on logits (B, V), composed by sample_next --------------------------------

def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019, §4.1) as Hugging Face applies it: the logit of every id
    already seen (seen: (B, V) bool) is divided by the penalty when positive and multiplied by it when
    negative, so that a penalty above 1 always makes the id less likely."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row, the rest -inf. Exactly k even when logits tie (torch.topk picks
    among them); masking the logits below the k-th value would keep every tied id."""
    top_logits, top_ids = torch.topk(logits, k, dim=-1)  # (B, k)
    return torch.full_like(logits, float("-inf")).scatter(-1, top_ids, top_logits)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020, §3.1): keep the smallest set of most likely ids whose
    probability reaches p, and at least the most likely one; the rest -inf. p = 1 keeps every id."""
    if p >= 1:
        return logits  # the rounding of a cumulative sum could otherwise drop the least likely ids
    # The nucleus is a prefix of the ids by probability: found among the TOP_P_CANDIDATES likeliest (a top-k
    # is ~35x faster than sorting 50k ids on a CPU) wherever it ends among them, else by sorting every id.
    sorted_logits, order = logits.topk(min(TOP_P_CANDIDATES, logits.size(-1)), dim=-1)  # (B, <= V)
    probs = (sorted_logits - logits.logsumexp(dim=-1, keepdim=True)).exp()
    if sorted_logits.size(-1) < logits.size(-1) and not (probs.sum(dim=-1) >= p).all():
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the more likely ids: exactly 0 for the first
    kept = sorted_logits.masked_fill(before >= p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, kept)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row of probs (B, V) -> (B,), by inverse transform sampling: a uniform number located in the
    cumulative sum. torch.multinomial draws V random numbers per row instead, 40x slower over GPT-2's 50k ids
    on a CPU."""
    return locate(cumulative(probs), probs.size(0), generator)


def cumulative(probs: torch.Tensor) -> torch.Tensor:
    """The cumulative sum along the last dimension in float64, which keeps each id's share of the sum exact
    (float32 rounding would misplace ~3e-4 of the probability)."""
    return probs.to(widest_float(probs.device)).cumsum(dim=-1)


def widest_float(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def locate(cdf: torch.Tensor, rows: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each of `rows` uniform numbers, the index of the first entry above it of cdf: (rows, V), one
    cumulative sum per row, or (V,), one for all."""
    total = cdf[..., -1:]  # (rows, 1) or (1,): 1, up to rounding
    u = torch.rand(rows, 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * total
    u = u.masked_fill(u >= total, 0)  # rounding can lift u to the total, past the last id
    # right=True: the first id whose cumulative sum exceeds u, so an id of probability 0 is never chosen.
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def sample_next(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None = None,
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). Hugging Face's order: the repetition penalty (given seen (B, V)), then
    argmax for temperature 0, else temperature, top-k, top-p and a draw from what is left."""
    if seen is not None:
        logits = penalize_repetition(logits, seen, settings.repetition_penalty)
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / settings.temperature
    if settings.top_k is not None:
        logits = top_k_filter(logits, settings.top_k)
    return draw(torch.softmax(top_p_filter(logits, settings.top_p), dim=-1), generator)


class CompactSampler:
    """Next ids from a compact head's distribution over every id without building its (B, V) logits: the
    class first, then, for "other", the rare id. It gives exactly sample_next's distribution over the
    expanded logits (class logit, plus log q for a rare id), as follows.

    - temperature t: a rare id's weight is exp((c_other + log q)/t), so "other" weighs
      exp(c_other/t) * sum(q^(1/t)) and the id within it follows q^(1/t); both are fixed for the call.
    - top-k: the k most likely ids are among the k best classes and the k likeliest rare ids (q's order),
      so the filters run on those 2k candidates alone.
    - top-p alone: the nucleus is a prefix of all ids sorted by probability. It is found among the K classes
      and the K likeliest rare ids, with probabilities over the whole vocabulary; every other id is at most
      as likely as the K-th rare id, so where the nucleus stops above that id it is exact, and elsewhere
      (a flat distribution) the step goes through the expanded logits.
    - greedy: the best class against the likeliest rare id, as one argmax over the K classes and that id.

    The repetition penalty changes single ids: it goes through the expanded logits (make_picker)."""

    def __init__(self, head: CompactHead, settings: SamplingSettings, generator: torch.Generator | None) -> None:
        self.head, self.settings, self.generator = head, settings, generator
        self.K = head.head_ids.numel()
        self.rare_ids, rare_log_q = head.rare_by_likelihood()  # (R,), likeliest first
        self.rare_log_q = rare_log_q.to(widest_float(rare_log_q.device))
        t = settings.temperature
        if t == 0:  # the likeliest rare id stands in for "other": its logit is c_other + its log q
            self.greedy_ids = torch.cat([head.head_ids, self.rare_ids[:1]])  # (K+1,)
            self.greedy_shift = torch.zeros(self.K + 1, dtype=self.rare_log_q.dtype, device=self.rare_ids.device)
            self.greedy_shift[self.K] = self.rare_log_q[0]
        if t > 0 and settings.top_k is None:  # sampling over every id, or the nucleus
            self.other_log_mass = torch.logsumexp(self.rare_log_q / t, dim=0)  # log sum(q^(1/t))
            self.rare_cdf = cumulative(torch.softmax(self.rare_log_q / t, dim=0))  # (R,)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, C) -> next ids (B,)."""
        t, top_k = self.settings.temperature, self.settings.top_k
        if t == 0:  # in float64, as log q; argmax takes the first of equal logits: a class before the rare id
            return self.greedy_ids[(self.head.class_logits(hidden) + self.greedy_shift).argmax(dim=-1)]
        c = self.head.class_logits(hidden).to(self.rare_log_q.dtype)  # (B, K+1), as precise as log q
        frequent, other = c[:, :self.K], c[:, self.K]
        if top_k is None and self.settings.top_p < 1:
            return self.nucleus(hidden, frequent, other)
        if top_k is None:
            chosen = draw(torch.softmax(self.tempered(frequent, other), dim=-1), self.generator)  # K: "other"
            rare = self.rare_ids[locate(self.rare_cdf, c.size(0), self.generator)]
            return torch.where(chosen == self.K, rare, self.head.head_ids[chosen.clamp(max=self.K - 1)])
        best_logits, best = frequent.topk(min(top_k, self.K), dim=-1)
        rare_logits = other[:, None] + self.rare_log_q[:top_k]  # (B, min(k, R))
        candidates = torch.cat([self.head.head_ids[best], self.rare_ids[:top_k].expand(c.size(0), -1)], dim=1)
        chosen = sample_next(torch.cat([best_logits, rare_logits], dim=1), self.settings, self.generator)
        return candidates.gather(1, chosen[:, None]).squeeze(1)

    def tempered(self, frequent: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """(B, K+1): each class's log weight at the temperature, "other" holding every rare id's."""
        t = self.settings.temperature
        return torch.cat([frequent / t, (other / t + self.other_log_mass)[:, None]], dim=1)

    def nucleus(self, hidden: torch.Tensor, frequent: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """top_p_filter and draw over the K classes and the K likeliest rare ids (see the class)."""
        t, B = self.settings.temperature, frequent.size(0)
        log_z = torch.logsumexp(self.tempered(frequent, other), dim=1)
        rare = (other[:, None] + self.rare_log_q[:self.K]) / t  # (B, <= K)
        probs = (torch.cat([frequent / t, rare], dim=1) - log_z[:, None]).exp()  # of the whole vocabulary
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        kept = torch.zeros_like(probs, dtype=torch.bool).scatter(
            -1, order, sorted_probs.cumsum(dim=-1) - sorted_probs < self.settings.top_p)
        left_out = self.rare_ids.numel() > self.K  # rare ids past the K-th, each at most as likely as it
        if left_out and (kept & (probs <= probs[:, -1:])).any():  # the nucleus reaches down to them
            return sample_next(self.head(hidden), self.settings, self.generator)
        chosen = draw(probs * kept, self.generator)
        candidates = torch.cat([self.head.head_ids.expand(B, -1), self.rare_ids[:self.K].expand(B, -1)], dim=1)
        return candidates.gather(1, chosen[:, None]).squeeze(1)


def make_picker(model: GPT, settings: SamplingSettings, generator: torch.Generator | None,
                seen: torch.Tensor | None, push: LogitBias | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function from the last position's hidden state (B, C) to the next ids (B,); `push` changes the
    logits first."""
    head = model.lm_head
    if isinstance(head, CompactHead) and seen is None and push is None:
        return CompactSampler(head, settings, generator)
    return lambda hidden: sample_next(head(hidden) if push is None else push.apply(head(hidden)), settings,
                                      generator, seen)




def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
