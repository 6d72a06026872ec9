"""Decoding ids, and `slm generate`.

`decode` yields the next ids of a batch of prompts of any lengths, every row running to max_new_tokens: they
are left-padded into one batch, and the KV cache (kv_cache.KVCache) masks the padding and counts each row's
positions from its first real token, so a row gets the same ids as its prompt decoded alone. Text (stop
strings, end-of-text, streaming) is batching.py's: its engine serves `slm generate`, chat, the server and the
samples printed in training.

`decode(..., use_cache=False)` recomputes the whole context every step: slow and obviously correct, it is the
reference the cached paths are tested against. When the context window fills, the window slides: the
recompute path keeps the last block_size tokens; the cached path refills its cache with the newest
block_size // 2 slots (absolute position embeddings cannot be shifted in place), so both agree exactly
while everything fits in one window. A batch slides together, when its longest row fills the window; a
shorter row then keeps its newest block_size // 2 tokens too, or all of them if it has fewer.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import torch

from slm.batching import complete, stream
from slm.config import add_checkpoint_choice, add_placement
from slm.constraints import Words
from slm.errors import SlmError
from slm.kv_cache import KVCache
from slm.model import GPT
from slm.sampling import (DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, SamplingSettings, WordBias, make_generator,
                          make_picker)
from slm.tokenizer import Tokenizer

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
