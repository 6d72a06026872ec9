"""Sampling and decoding: sampling filters, KV-cache decoding, streaming, and `slm generate`.

One engine serves `slm generate`, the samples printed in training, chat and the server. `decode` runs a batch
of prompts of any lengths: they are left-padded into one batch, and the KV cache (kv_cache.py) masks the
padding and counts each row's positions from its first real token, so a row gets the same ids as its prompt
decoded alone.
`stream` turns the ids into text, row by row, ending each row with a finish reason: "stop" (end-of-text or a
stop string) or "length" (max_new_tokens reached). Each step runs the head at the newest position only; a
compact head samples its class, then the id (CompactSampler), without building 50,257 logits.

`decode(..., use_cache=False)` recomputes the whole context every step: slow and obviously correct, it is the
reference the cached path is tested against. When the context window fills, the window slides: the
recompute path keeps the last block_size tokens; the cached path refills its cache with the newest
block_size // 2 slots (absolute position embeddings cannot be shifted in place), so both agree exactly
while everything fits in one window. A batch slides together, when its longest row fills the window; a
shorter row then keeps its newest block_size // 2 tokens too, or all of them if it has fewer.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from slm.config import add_checkpoint_choice, add_placement
from slm.constraints import Words
from slm.errors import SlmError
from slm.kv_cache import KVCache
from slm.model import GPT, CompactHead
from slm.tokenizer import StopText, StreamDecoder, Tokenizer

MAX_NEW_TOKENS = 100_000
# The sampling defaults of every command (generate, chat, eval-assistant's --max-new-tokens, training's
# samples). SamplingSettings' own temperature stays 1, the model's plain distribution, for library callers.
DEFAULT_TEMPERATURE = 0.8  # a little sharper than the model's own distribution: fewer stray words
DEFAULT_MAX_NEW_TOKENS = 256  # room for a whole story: the demo corpus's are 110 to 250 tokens


@dataclass(frozen=True)
class SamplingSettings:
    """How each next id is picked and when a row ends. `check` is the one place they are validated."""

    temperature: float = 1.0  # 0 is greedy; above 1 flattens the distribution, below 1 sharpens it
    top_k: int | None = None  # sample among the k most likely ids only (exactly k, even with ties)
    top_p: float = 1.0  # nucleus: the smallest set of most likely ids whose probability reaches top_p
    repetition_penalty: float = 1.0  # CTRL: above 1, ids already in the prompt or the output get less likely
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop: tuple[str, ...] = ()  # a row ends when its text contains one of these; its text ends before it
    # added to the logit of each word a request names (its first id, in each form) until the row writes it
    word_bias: float = 0.0

    def check(self, vocab_size: int) -> None:
        """Raise SlmError naming the flag of the first bad value. `not x >= 0` rather than `x < 0` refuses NaN."""
        if not self.temperature >= 0:
            raise SlmError(f"--temperature must be >= 0 (got {self.temperature}); use 0 for greedy decoding")
        if self.top_k is not None and not 1 <= self.top_k <= vocab_size:
            raise SlmError(f"--top-k must be between 1 and {vocab_size} (got {self.top_k}); omit it to sample all ids")
        if not 0 < self.top_p <= 1:
            raise SlmError(f"--top-p must be in (0, 1] (got {self.top_p}); use 1 to keep every id")
        if not self.repetition_penalty > 0:
            raise SlmError(f"--repetition-penalty must be > 0 (got {self.repetition_penalty}); use 1 for none")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise SlmError(f"--max-new-tokens must be between 1 and {MAX_NEW_TOKENS} (got {self.max_new_tokens})")
        if not 0 <= self.word_bias <= 100:
            raise SlmError(f"--word-bias must be between 0 and 100 (got {self.word_bias}); use 0 for none")
        if "" in self.stop:
            raise SlmError("--stop must not be empty: every text contains the empty string")


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
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the more likely ids: exactly 0 for the first
    kept = sorted_logits.masked_fill(before >= p, float("-inf"))
    return torch.empty_like(logits).scatter(-1, order, kept)


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
                seen: torch.Tensor | None, bias: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function from the last position's hidden state (B, C) to the next ids (B,); `bias` (B, V) is
    added to the logits first."""
    head = model.lm_head
    if isinstance(head, CompactHead) and seen is None and bias is None:
        return CompactSampler(head, settings, generator)
    return lambda hidden: sample_next(head(hidden) if bias is None else head(hidden) + bias, settings, generator, seen)


class WordBias:
    """The (B, V) logit bias of each row's requested words; a word's bias goes once the row writes its first id."""

    def __init__(self, words: list[Words], strength: float, vocab_size: int, device: torch.device) -> None:
        self.left, self.strength = [list(row) for row in words], strength
        self.bias = torch.zeros(len(words), vocab_size, device=device)
        for row in range(len(words)):
            self.reset(row)

    def reset(self, row: int) -> None:
        self.bias[row] = 0
        for ids in self.left[row]:
            self.bias[row, list(ids)] = self.strength

    def written(self, next_ids: list[int]) -> None:
        for row, next_id in enumerate(next_ids):
            if any(next_id in ids for ids in self.left[row]):
                self.left[row] = [ids for ids in self.left[row] if next_id not in ids]
                self.reset(row)


# ---- decoding ---------------------------------------------------------------------------------------------------

def keep_last(context: torch.Tensor, pad: list[int], width: int) -> tuple[torch.Tensor, list[int]]:
    """The newest `width` columns of a left-padded batch (B, L), and the padding left in each row."""
    cut = max(0, context.size(1) - width)
    return context[:, cut:], [max(0, n - cut) for n in pad]


def decode(model: GPT, prompts: list[list[int]], settings: SamplingSettings,
           generator: torch.Generator | None = None, use_cache: bool = True,
           words: list[Words] | None = None) -> Iterator[torch.Tensor]:
    """Yield the next ids (B,) of every row, settings.max_new_tokens times, after prompts of any lengths; every
    row runs to the end (stop strings and end-of-text are `stream`'s business). `words`: each row's requested
    words (word_first_ids), pushed by settings.word_bias. The settings and prompts are checked on the call,
    before the first step is asked for. Full recompute takes prompts of one length."""
    settings.check(model.config.vocab_size)
    if not prompts or not all(prompts):
        raise SlmError("every prompt needs at least one token; end-of-text alone starts a new document")
    if not use_cache and len({len(p) for p in prompts}) > 1:
        raise ValueError("full recompute has no padding mask: give it prompts of one length")
    return _decode_steps(model, prompts, settings, generator, use_cache, words)


@torch.no_grad()
def _decode_steps(model: GPT, prompts: list[list[int]], settings: SamplingSettings,
                  generator: torch.Generator | None, use_cache: bool,
                  words: list[Words] | None) -> Iterator[torch.Tensor]:
    block_size, device = model.config.block_size, model.transformer.wte.weight.device
    width = max(len(p) for p in prompts)
    pad = [width - len(p) for p in prompts]
    # Left padding puts every row's newest id in the last column; the pad id (0) is never attended to.
    context = torch.tensor([[0] * n + p for n, p in zip(pad, prompts)], device=device)  # (B, width)
    context, pad = keep_last(context, pad, block_size)  # a prompt longer than the window keeps its end
    rows = torch.arange(len(prompts), device=device)
    seen = None  # (B, V): every id of the prompt and the output so far, for the repetition penalty
    if settings.repetition_penalty != 1:
        seen = torch.zeros(len(prompts), model.config.vocab_size, dtype=torch.bool, device=device)
        for row, ids in enumerate(prompts):
            seen[row, ids] = True
    pushed = None
    if words and settings.word_bias and any(words):
        pushed = WordBias(words, settings.word_bias, model.config.vocab_size, device)
    pick = make_picker(model, settings, generator, seen, pushed.bias if pushed else None)
    cache, new, cached = None, context, []  # cached: the ids (B, 1) the cache holds beyond `context`
    for _ in range(settings.max_new_tokens):
        if use_cache:
            if cache is None or cache.position == block_size:
                if cache is not None:  # the window is full: slide it, keeping the newest half
                    context, pad = keep_last(torch.cat([context, *cached, new], dim=1), pad, block_size // 2)
                    new, cached = context, []
                cache = KVCache(model, pad)
            else:
                cached.append(new)  # joined to the context only when the window slides, not at every step
            hidden = model.hidden(new, kv_cache=cache)
            cache.advance(new.size(1))
        else:
            hidden = model.hidden(context)
        next_id = pick(hidden[:, -1])  # (B,)
        yield next_id
        if seen is not None:
            seen[rows, next_id] = True
        if pushed is not None:
            pushed.written(next_id.tolist())
        new = next_id[:, None]
        if not use_cache:
            context, pad = keep_last(torch.cat([context, new], dim=1), pad, block_size)


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
    """The prompts idx (B, T) followed by max_new_tokens ids each, end-of-text or not: (B, T + max_new_tokens)."""
    settings = SamplingSettings(temperature, top_k, max_new_tokens=max_new_tokens)
    new = list(decode(model, idx.tolist(), settings, generator, use_cache))
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1)


# ---- text -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextDelta:
    """New text of one row of a batch. A row's last delta has a finish_reason: "stop" (end-of-text or a stop
    string) or "length" (max_new_tokens reached); every row gets exactly one such delta."""

    row: int
    text: str
    tokens: int  # ids the row has generated so far, end-of-text and stop strings included
    finish_reason: str | None = None


def stream(model: GPT, tokenizer: Tokenizer, prompts: list[list[int]], settings: SamplingSettings,
           generator: torch.Generator | None = None, words: list[Words] | None = None) -> Iterator[TextDelta]:
    """Text deltas of every row as its ids arrive, until each row has finished. A row finishes at end-of-text
    (not part of its text), at a stop string (nor is that) or after max_new_tokens ids. The settings and
    prompts are checked on the call (SlmError), before anything is generated."""
    return _deltas(decode(model, prompts, settings, generator, words=words), tokenizer, settings, len(prompts))


def _deltas(steps: Iterator[torch.Tensor], tokenizer: Tokenizer, settings: SamplingSettings,
            batch: int) -> Iterator[TextDelta]:
    decoders = [StreamDecoder(tokenizer) for _ in range(batch)]  # a character split across ids waits
    texts = [StopText(settings.stop) for _ in range(batch)]
    live = set(range(batch))
    for step, next_ids in enumerate(steps, start=1):
        ids = next_ids.tolist()  # one wait for the device per step, not one per row
        for row in sorted(live):
            eot = ids[row] == tokenizer.eot_id
            final = eot or step == settings.max_new_tokens
            piece = "" if eot else decoders[row].add(ids[row])
            text, stopped = texts[row].add(piece + (decoders[row].flush() if final else ""), final)
            reason = "stop" if eot or stopped else "length" if final else None
            if text or reason:
                yield TextDelta(row, text, step, reason)
            if reason:
                live.discard(row)
        if not live:
            return  # until every row has finished, a finished row is still computed and its ids ignored


def complete(model: GPT, tokenizer: Tokenizer, prompts: list[list[int]], settings: SamplingSettings,
             generator: torch.Generator | None = None, words: list[Words] | None = None) -> list[TextDelta]:
    """Each row's whole text, generated ids and finish reason: `stream`'s deltas added up."""
    texts, last = [""] * len(prompts), {}
    for delta in stream(model, tokenizer, prompts, settings, generator, words):
        texts[delta.row] += delta.text
        last[delta.row] = delta
    return [dataclasses.replace(last[row], text=texts[row]) for row in range(len(prompts))]


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample_text(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int,
                temperature: float = DEFAULT_TEMPERATURE, top_k: int | None = 200, seed: int | None = None) -> str:
    """The prompt and a sample after it, ending at end-of-text; for the samples printed during training."""
    settings = SamplingSettings(temperature, top_k, max_new_tokens=max_new_tokens)
    ids = prompt_ids(tokenizer, prompt, model.config.block_size)
    generator = make_generator(model.transformer.wte.weight.device, seed)
    return prompt + complete(model, tokenizer, [ids], settings, generator)[0].text


def prompt_ids(tokenizer: Tokenizer, prompt: str, block_size: int) -> list[int]:
    """The prompt's ids, or end-of-text alone to start a new document. A prompt longer than the
    context keeps its last block_size - 1 tokens, with a warning on stderr."""
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    if len(ids) >= block_size:
        print(f"slm: warning: the prompt has {len(ids)} tokens but the context holds {block_size}; "
              f"keeping its last {block_size - 1}", file=sys.stderr)
        ids = ids[-(block_size - 1):]
    return ids


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_choice(p)
    add_placement(p)
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help="the most new tokens per sample (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help="0 = greedy; higher = more random (default: %(default)s)")
    p.add_argument("--top-k", type=int, help="sample only among the k most likely ids")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample only among the most likely ids whose probability reaches p (default: 1, all)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="above 1, ids already in the prompt or the output get less likely (default: 1, none)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the sample where this text appears, leaving it out; may be repeated")
    p.add_argument("--seed", type=int, help="seed for sampling; the same seed gives the same text")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples to write (default: 1)")


def main(args) -> int:
    from slm.checkpoint import checkpoint_dir, load_model
    from slm.device import pick_device, pick_dtype
    from slm.tokenizer import get_tokenizer

    device = pick_device(args.device)
    model, cfg, _ = load_model(checkpoint_dir(args.run, args.checkpoint), device, pick_dtype(args.dtype, device))
    tokenizer = get_tokenizer()
    if args.num_samples < 1:
        raise SlmError(f"--num-samples must be at least 1 (got {args.num_samples})")
    settings = SamplingSettings(args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                                args.max_new_tokens, tuple(args.stop))
    ids = prompt_ids(tokenizer, args.prompt, cfg.model.block_size)
    generator = make_generator(device, args.seed)
    for sample in range(args.num_samples):
        deltas = stream(model, tokenizer, [ids], settings, generator)  # checks the settings before any output
        if sample:
            sys.stdout.write("\n<|endoftext|>\n")
        sys.stdout.write(args.prompt)
        for delta in deltas:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    sys.stdout.flush()
    return 0
