"""Training windows from the token memmaps that `slm prepare` writes.

The order of windows is a pure function of (seed, step): the global batch of step s is drawn from
`numpy.random.default_rng((seed, s))`. Resuming needs no sampler state beyond the step, and every process
of a distributed run slices the same global batch, so the data order never depends on the world size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from slm.errors import SlmError

SPLITS = ("train", "validation")
_VALIDATION_STREAM = 2**31 - 1  # a step number training never reaches: the fixed validation windows


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise SlmError(f"{data_dir} is not a prepared data folder (no meta.json); make one with "
                       f"`slm prepare SOURCE --out {data_dir}`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        meta["splits"], meta["tokenizer"], meta["dtype"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise SlmError(f"{path} is corrupt ({err}); prepare the data again with --force") from None
    return meta


def open_split(data_dir: str | Path, split: str) -> np.memmap:
    """The split's tokens as a read-only memmap (never loaded whole into RAM)."""
    meta = read_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    expected = meta["splits"].get(split, {}).get("tokens")
    if not path.is_file() or expected is None:
        raise SlmError(f"{path} is missing; prepare the data again with `slm prepare ... --force`")
    dtype = np.dtype(meta["dtype"])
    if path.stat().st_size != expected * dtype.itemsize:
        raise SlmError(f"{path} holds {path.stat().st_size} bytes but meta.json promises {expected} "
                       f"{dtype} tokens; prepare the data again with --force")
    return np.memmap(path, dtype=dtype, mode="r")


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
