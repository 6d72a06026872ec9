"""The key/value cache `generate.decode` steps over: one window of a left-padded batch, allocated once.

A one-token step of a small model on a CPU spends about as long dispatching its operations as multiplying
(benchmarks/README.md, "Decoding at batch 1 against llama.cpp"), so the cache adds as few operations as it
can: every layer's keys and values are written in place into tensors allocated once for the window, the
position ids of an unpadded batch are a slice of one range made once, and an unpadded batch asks for no mask
at all, since its one new token may attend to every cached slot.
"""

from __future__ import annotations

import torch

from slm.model import GPT


class KVCache:
    """Keys and values of every layer for one window, n_layer tensors (B, H, block_size, D) each, of a
    left-padded batch: the first pad[b] slots of row b hold padding, which no real token ever attends to."""

    def __init__(self, model: GPT, pad: list[int]) -> None:
        cfg, wte = model.config, model.transformer.wte.weight
        shape = (len(pad), cfg.n_head, cfg.block_size, cfg.head_dim)
        self.k = [torch.empty(shape, device=wte.device, dtype=wte.dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.empty(shape, device=wte.device, dtype=wte.dtype) for _ in range(cfg.n_layer)]
        self.pad = torch.tensor(pad, device=wte.device)[:, None, None]  # (B, 1, 1)
        self.padded = any(pad)  # known on the host, so picking the fast path never waits for the device
        self.slots = torch.arange(cfg.block_size, device=wte.device)  # (block_size,): sliced, never rebuilt
        self.position = 0
        self._mask: torch.Tensor | None = None  # this step's, built by the first layer to ask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.position + k.size(2)
        self.k[layer][:, :, self.position:end] = k
        self.v[layer][:, :, self.position:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, tokens: int) -> None:
        self.position += tokens
        self._mask = None

    def positions(self, T: int) -> torch.Tensor:
        if self.position + T > self.slots.numel():
            raise ValueError(f"sequence of {self.position + T} tokens exceeds block_size {self.slots.numel()}")
        if not self.padded:
            return self.slots[None, self.position:self.position + T]  # (1, T), the same for every row
        slots = self.slots[self.position:self.position + T]  # (T,)
        return (slots - self.pad[:, 0]).clamp(min=0)  # (B, T); padding says 0, and is never attended to

    def attention_mask(self, T: int) -> torch.Tensor | None:
        if not self.padded and (self.position == 0 or T == 1):
            return None
        if self._mask is None:  # every layer of a step asks for the same mask: build it once
            self._mask = self._build_mask(T)
        return self._mask

    def _build_mask(self, T: int) -> torch.Tensor:
        query = self.slots[self.position:self.position + T, None]  # (T, 1)
        key = self.slots[:self.position + T]  # (L,)
        # A padding slot attends to itself alone. With no key at all its softmax is 0/0: NaN in SDPA before
        # PyTorch 2.5 and in some fused kernels (pytorch#103963), and a NaN value reaches real tokens in the
        # next layer even where it is masked out (pytorch#101967).
        mask = (key <= query) & ((key >= self.pad) | (key == query))  # (B, T, L)
        return mask[:, None]  # (B, 1, T, L)

