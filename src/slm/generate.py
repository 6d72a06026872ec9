"""Sampling and decoding: the KV cache, sampling filters, streaming, and `slm generate`.

`generate_tokens(..., use_cache=False)` recomputes the whole context every step: slow and obviously correct,
it is the reference the cached path is tested against. When the context window fills, the window slides:
the recompute path keeps the last block_size tokens; the cached path refills its cache with the last
block_size // 2 tokens (absolute position embeddings cannot be shifted in place), so both agree exactly
while everything fits in one window.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch

from slm.errors import SlmError
from slm.model import GPT

MAX_NEW_TOKENS = 100_000


class KVCache:
    """Keys and values of every layer, preallocated for one window: (n_layer, B, H, block_size, D)."""

    def __init__(self, model: GPT, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        cfg = model.config
        shape = (cfg.n_layer, batch_size, cfg.n_head, cfg.block_size, cfg.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.position = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.position + k.size(2)
        self.k[layer, :, :, self.position:end] = k
        self.v[layer, :, :, self.position:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, tokens: int) -> None:
        self.position += tokens


def check_sampling(temperature: float, top_k: int | None, max_new_tokens: int, vocab_size: int) -> None:
    if temperature < 0:
        raise SlmError(f"--temperature must be >= 0 (got {temperature}); use 0 for greedy decoding")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise SlmError(f"--top-k must be between 1 and {vocab_size} (got {top_k}); omit it to sample all ids")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise SlmError(f"--max-new-tokens must be between 1 and {MAX_NEW_TOKENS} (got {max_new_tokens})")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy; top-k keeps exactly k ids even with ties."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        top_logits, top_ids = torch.topk(logits, top_k, dim=-1)  # exactly k, whatever the ties
        choice = torch.multinomial(torch.softmax(top_logits, dim=-1), 1, generator=generator)
        return top_ids.gather(-1, choice).squeeze(-1)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_tokens(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, generator: torch.Generator | None = None,
                    use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield the next ids (B,) one step at a time after the prompt idx (B, T)."""
    block_size = model.config.block_size
    context = idx[:, -block_size:]
    cache = None
    next_input = context
    for _ in range(max_new_tokens):
        if use_cache:
            if cache is None or cache.position == block_size:
                if cache is not None:  # the window is full: slide it, keeping the newest half
                    next_input = context[:, -(block_size // 2):]
                cache = KVCache(model, idx.size(0), idx.device, model.lm_head.weight.dtype)
            logits, _ = model(next_input, kv_cache=cache)
            cache.advance(next_input.size(1))
        else:
            logits, _ = model(context)
        next_id = sample_next(logits[:, -1, :], temperature, top_k, generator)
        yield next_id
        context = torch.cat([context, next_id[:, None]], dim=1)[:, -block_size:]
        next_input = next_id[:, None]


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """The prompt idx (B, T) followed by max_new_tokens generated ids: (B, T + max_new_tokens)."""
    new = list(generate_tokens(model, idx, max_new_tokens, **kwargs))
    return torch.cat([idx] + [t[:, None] for t in new], dim=1)


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample_text(model: GPT, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                top_k: int | None = 200, seed: int | None = None) -> str:
    """A one-shot sample as text (stops at end-of-text); used for the samples printed during training."""
    device = model.lm_head.weight.device
    ids = prompt_ids(tokenizer, prompt, model.config.block_size)
    out = []
    for next_id in generate_tokens(model, torch.tensor([ids], device=device), max_new_tokens, temperature, top_k,
                                   make_generator(device, seed)):
        if next_id.item() == tokenizer.eot_id:
            break
        out.append(next_id.item())
    return prompt + tokenizer.decode(out)


def prompt_ids(tokenizer, prompt: str, block_size: int) -> list[int]:
    """The prompt's ids, or end-of-text alone to start a new document. A prompt longer than the
    context keeps its last block_size - 1 tokens, with a warning on stderr."""
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    if len(ids) >= block_size:
        print(f"slm: warning: the prompt has {len(ids)} tokens but the context holds {block_size}; "
              f"keeping its last {block_size - 1}", file=sys.stderr)
        ids = ids[-(block_size - 1):]
    return ids


def main(args) -> int:
    from slm.checkpoint import checkpoint_dir, load_model
    from slm.device import pick_device
    from slm.tokenizer import StreamDecoder, get_tokenizer

    device = pick_device(args.device)
    model, cfg, _ = load_model(checkpoint_dir(args.run, args.checkpoint), device)
    tokenizer = get_tokenizer()
    check_sampling(args.temperature, args.top_k, args.max_new_tokens, cfg.model.vocab_size)
    if args.num_samples < 1:
        raise SlmError(f"--num-samples must be at least 1 (got {args.num_samples})")
    ids = torch.tensor([prompt_ids(tokenizer, args.prompt, cfg.model.block_size)], device=device)
    generator = make_generator(device, args.seed)
    for sample in range(args.num_samples):
        if sample:
            sys.stdout.write("\n<|endoftext|>\n")
        sys.stdout.write(args.prompt)
        decoder = StreamDecoder(tokenizer)
        for next_id in generate_tokens(model, ids, args.max_new_tokens, args.temperature, args.top_k, generator):
            if next_id.item() == tokenizer.eot_id:
                break
            sys.stdout.write(decoder.add(next_id.item()))
            sys.stdout.flush()
        sys.stdout.write(decoder.flush())
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    sys.stdout.flush()
    return 0
