"""Decoding ids, and `slm generate`.

`decode` yields the next ids of a batch of prompts of any lengths, every row running to max_new_tokens:
cached, it reads them off engine.Engine's rows (each decodes as its prompt would alone); text (stop strings,
end-of-text, streaming) is engine.stream's.

`decode(..., use_cache=False)` recomputes the whole context every step: slow and obviously correct, it is the
reference the cached path is tested against. When a row's context window fills, the window slides: the
recompute path keeps the last block_size tokens; the cached path refills the row's cache with its newest
block_size // 2 ids (absolute position embeddings cannot be shifted in place), so both agree exactly while
everything fits in one window.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import torch

from slm.config import add_checkpoint_choice, add_placement
from slm.data.tokenizer import Tokenizer
from slm.errors import SlmError
from slm.inference.engine import Engine, complete, stream
from slm.inference.logit_bias import LogitBias, Words
from slm.inference.sampling import (DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, SamplingSettings, add_sampling_flags,
                                    make_generator, make_picker)
from slm.model.gpt import GPT


def decode(model: GPT, prompts: list[list[int]], settings: SamplingSettings,
           generator: torch.Generator | None = None, use_cache: bool = True,
           words: list[Words] | None = None) -> Iterator[torch.Tensor]:
    """Yield the next ids (B,) of every row, settings.max_new_tokens times, after prompts of any lengths; every
    row runs to the end (stop strings and end-of-text are text's business: engine.stream). `words`: each
    row's requested words (logit_bias.word_forms), pushed by settings.word_bias. The settings and prompts are
    checked on the call, before the first step is asked for. Full recompute takes prompts of one length."""
    settings.check(model.config.vocab_size)
    if not prompts or not all(prompts):
        raise SlmError("every prompt needs at least one token; end-of-text alone starts a new document")
    if use_cache:
        return _cached_steps(model, prompts, settings, generator, words)
    if len({len(p) for p in prompts}) > 1:
        raise ValueError("full recompute has no padding mask: give it prompts of one length")
    return _recomputed_steps(model, prompts, settings, generator, words)


def _cached_steps(model: GPT, prompts: list[list[int]], settings: SamplingSettings,
                  generator: torch.Generator | None, words: list[Words] | None) -> Iterator[torch.Tensor]:
    """The engine's rows without text, read one id each per step."""
    engine = Engine(model, None, len(prompts), generator)
    rows = [engine.add(ids, settings, words=words[row] if words else None) for row, ids in enumerate(prompts)]
    while engine.rows:
        engine.step()
        yield torch.tensor([row.next_id for row in rows])


@torch.no_grad()
def _recomputed_steps(model: GPT, prompts: list[list[int]], settings: SamplingSettings,
                      generator: torch.Generator | None, words: list[Words] | None) -> Iterator[torch.Tensor]:
    block_size, device = model.config.block_size, model.transformer.wte.weight.device
    context = torch.tensor(prompts, device=device)[:, -block_size:]  # (B, T): its newest block_size ids
    rows = torch.arange(len(prompts), device=device)
    seen = None  # (B, V): every id of the prompt and the output so far, for the repetition penalty
    if settings.repetition_penalty != 1:
        seen = torch.zeros(len(prompts), model.config.vocab_size, dtype=torch.bool, device=device)
        for row, ids in enumerate(prompts):
            seen[row, ids] = True
    pushed = None
    if (words and settings.word_bias and any(words)) or settings.dry_multiplier:
        pushed = LogitBias(words or [[] for _ in prompts], settings, model.config.vocab_size, device)
    pick = make_picker(model, settings, generator, seen, pushed)
    for _ in range(settings.max_new_tokens):
        next_id = pick(model.hidden(context)[:, -1])  # (B,)
        yield next_id
        if seen is not None:
            seen[rows, next_id] = True
        if pushed is not None:
            pushed.written(next_id.tolist())
        context = torch.cat([context, next_id[:, None]], dim=1)[:, -block_size:]


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
    add_sampling_flags(p, {"temperature": DEFAULT_TEMPERATURE, "top_k": None, "top_p": 1, "repetition_penalty": 1})
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the sample where this text appears, leaving it out; may be repeated")
    p.add_argument("--seed", type=int, help="seed for sampling; the same seed gives the same text")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples to write (default: 1)")


def main(args) -> int:
    from slm.data.tokenizer import get_tokenizer
    from slm.device import pick_device, pick_dtype
    from slm.runs.checkpoint import checkpoint_dir, load_model

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
