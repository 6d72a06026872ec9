"""The key/value cache decoding steps over: a slot per sequence of the running batch (engine.py), allocated
once.

A one-token step of a small model on a CPU spends about as long dispatching its operations as multiplying
(benchmarks/README.md, "Decoding at batch 1 against llama.cpp"), so the cache adds as few operations as it
can: every layer's keys and values are written in place into tensors allocated once, position ids are a
slice of one range made once when the rows are at one length, and rows at one length ask for no mask at
all, since each new token may attend to every cached slot of its row.
"""

from __future__ import annotations

import torch

from slm.model.gpt import GPT


class SlotCache:
    """Keys and values of up to `rows` sequences of a running batch (engine.py), each in a slot of its own and
    at its own length: n_layer tensors (rows, H, block_size, D). The sequences decoding hold slots 0..n-1, so a
    step reads a slice of the cache, never a gathered copy. Zeros, not empty memory: a step attends over the
    longest row's keys and masks the rest, and a masked NaN would still poison the softmax."""

    def __init__(self, model: GPT, rows: int) -> None:
        cfg, wte = model.config, model.transformer.wte.weight
        shape = (rows, cfg.n_head, cfg.block_size, cfg.head_dim)
        self.k = [torch.zeros(shape, device=wte.device, dtype=wte.dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=wte.device, dtype=wte.dtype) for _ in range(cfg.n_layer)]
        self.slots = torch.arange(cfg.block_size, device=wte.device)

    def prefill(self, slots: list[int]) -> SlotPrefill:
        """The cache of one forward pass over sequences of one length from position 0, into these slots."""
        return SlotPrefill(self, torch.tensor(slots, device=self.slots.device))

    def step(self, lengths: list[int]) -> SlotStep:
        """The cache of one one-token step of the sequences in slots 0..len(lengths)-1, at these lengths."""
        return SlotStep(self, lengths)

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` cached positions of slot source into slot target."""
        for cache in (*self.k, *self.v):
            cache[target, :, :length] = cache[source, :, :length]


class SlotPrefill:
    """Whole prompts of T tokens: plain causal attention over their own keys, which are also written to the slots."""

    def __init__(self, cache: SlotCache, slots: torch.Tensor) -> None:
        self.cache, self.slots = cache, slots

    def positions(self, T: int) -> torch.Tensor:
        return self.cache.slots[None, :T]

    def attention_mask(self, T: int) -> None:
        return None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.size(2)
        self.cache.k[layer][:, :, :T].index_copy_(0, self.slots, k)
        self.cache.v[layer][:, :, :T].index_copy_(0, self.slots, v)
        return k, v


class SlotStep:
    """One new token per sequence, each at its own position. Sequences of one length (one request's choices,
    or a batch alone) need no mask and write one slice; otherwise each row writes at its length and the
    mask hides the slots past it."""

    def __init__(self, cache: SlotCache, lengths: list[int]) -> None:
        self.cache, self.n, self.end = cache, len(lengths), max(lengths) + 1
        slots = cache.slots
        if len(set(lengths)) == 1:
            self.at, self.mask = None, None
            self.pos = slots[None, lengths[0]:lengths[0] + 1]  # (1, 1)
        else:
            self.at = torch.tensor(lengths, device=slots.device)  # (n,)
            self.rows = torch.arange(self.n, device=slots.device)
            self.pos = self.at[:, None]  # (n, 1)
            self.mask = (slots[None, :self.end] <= self.pos)[:, None, None]  # (n, 1, 1, end)

    def positions(self, T: int) -> torch.Tensor:
        return self.pos

    def attention_mask(self, T: int) -> torch.Tensor | None:
        return self.mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.k[layer], self.cache.v[layer]
        if self.at is None:
            keys[:self.n, :, self.end - 1:self.end] = k
            values[:self.n, :, self.end - 1:self.end] = v
        else:
            keys[self.rows, :, self.at] = k[:, :, 0]
            values[self.rows, :, self.at] = v[:, :, 0]
        return keys[:self.n, :, :self.end], values[:self.n, :, :self.end]
