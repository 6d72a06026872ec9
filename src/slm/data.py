"""Training windows from the token memmaps that `slm prepare` writes.

The order of windows is a pure function of (seed, step): the global batch of step s is drawn from
`numpy.random.default_rng((seed, s))`. Resuming needs no sampler state beyond the step, and every process
of a distributed run slices the same global batch, so the data order never depends on the world size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from slm.errors import SlmError
from slm.prepare import read_meta

SPLITS = ("train", "validation")
_VALIDATION_STREAM = 2**31 - 1  # a step number training never reaches: the fixed validation windows


def open_split(data_dir: str | Path, split: str) -> np.memmap:
    """The split's tokens as a read-only memmap (never loaded whole into RAM)."""
    meta = read_meta(data_dir)  # also checks each bin's size against its token count
    return np.memmap(Path(data_dir) / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")


def check_fits(tokens: np.memmap, block_size: int, split: str) -> None:
    if len(tokens) < block_size + 1:
        raise SlmError(f"the {split} split has {len(tokens)} tokens, fewer than block_size + 1 = "
                       f"{block_size + 1}; lower --block-size or prepare more data")


def window_starts(seed: int, step: int, count: int, n_tokens: int, block_size: int) -> np.ndarray:
    """Start offsets of the `count` windows of (block_size + 1) tokens that make step `step`'s batch."""
    rng = np.random.default_rng((seed, step))
    return rng.integers(0, n_tokens - block_size, size=count, dtype=np.int64)


def validation_starts(seed: int, count: int, n_tokens: int, block_size: int) -> np.ndarray:
    """The fixed windows every evaluation of a run scores, so validation losses are comparable."""
    return window_starts(seed, _VALIDATION_STREAM, count, n_tokens, block_size)


def get_batch(tokens: np.memmap, starts: np.ndarray, block_size: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """x = window[:-1], y = window[1:] for each start: (B, block_size) int64 on device."""
    windows = np.stack([tokens[s:s + block_size + 1] for s in starts]).astype(np.int64)
    batch = torch.from_numpy(windows)
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    else:
        batch = batch.to(device)
    return batch[:, :-1], batch[:, 1:]


def token_counts(tokens: np.memmap, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    """How often each id occurs, counted a chunk at a time so a corpus larger than RAM works."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), chunk):
        counts += np.bincount(tokens[start:start + chunk], minlength=vocab_size)[:vocab_size]
    return counts
