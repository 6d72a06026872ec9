"""Training windows: pretraining's, from the token memmaps that `slm prepare` writes, and fine-tuning's, from
conversations packed into one stream with the loss on the assistant's tokens only.

The order of windows is a pure function of (seed, step): the global batch of step s is drawn from
`numpy.random.default_rng((seed, s))` (`--windows random`), or is the s-th batch of a sequence of shuffled
passes over the data, each drawn from (seed, pass) (`--windows shuffled`). Resuming needs no sampler state
beyond the step, and every process of a distributed run slices the same global batch, so the data order never
depends on the world size.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slm.config import Config
from slm.data.prepare import read_meta
from slm.data.requests import story_facts, story_request
from slm.data.template import Message, render, render_text
from slm.data.tokenizer import EOT_ID, get_tokenizer
from slm.device import World
from slm.errors import SlmError
from slm.model.gpt import IGNORE_INDEX

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets), each (B, T)
_VALIDATION_STREAM = 2**31 - 1  # a step number training never reaches: the fixed validation windows
_SHUFFLED_STREAM = 2**31 - 2  # keeps the passes' draws apart from the random windows' and validation's


def open_split(data_dir: str | Path, split: str) -> np.memmap:
    """The split's tokens as a read-only memmap (never loaded whole into RAM)."""
    meta = read_meta(data_dir)  # also checks each bin's size against its token count
    return np.memmap(Path(data_dir) / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")


def check_fits(tokens: np.memmap, block_size: int, split: str) -> None:
    if len(tokens) < block_size + 1:
        raise SlmError(f"the {split} split has {len(tokens)} tokens, fewer than block_size + 1 = "
                       f"{block_size + 1}; lower --block-size or prepare more data")


def check_data_matches(meta: dict, cfg: Config, tokenizer_identity: dict) -> None:
    """The data (its meta.json, or a file's tokenizer) was tokenized as this model reads, into ids it has."""
    if meta["tokenizer"].get("vocab_hash") != tokenizer_identity["vocab_hash"]:
        raise SlmError(f"the data was prepared with tokenizer {meta['tokenizer'].get('name')!r} "
                       f"({meta['tokenizer'].get('vocab_hash')}), not this model's {tokenizer_identity['name']!r}; "
                       f"prepare it again")
    if meta["tokenizer"]["vocab_size"] > cfg.model.vocab_size:
        raise SlmError(f"the data has {meta['tokenizer']['vocab_size']} token ids but --vocab-size is "
                       f"{cfg.model.vocab_size}; raise --vocab-size to at least that")


def window_starts(seed: int, step: int, count: int, n_tokens: int, block_size: int) -> np.ndarray:
    """Start offsets of the `count` windows of (block_size + 1) tokens that make step `step`'s batch."""
    rng = np.random.default_rng((seed, step))
    return rng.integers(0, n_tokens - block_size, size=count, dtype=np.int64)


class ShuffledWindows:
    """Windows drawn without replacement. Pass p over the data cuts it into `windows` consecutive windows that
    start at a random offset below block_size (so that window edges move between passes) and visits them in a
    random order, both drawn from (seed, p); the batches of the steps run through one pass after another. Where
    random windows, five passes' worth, leave ~1 token in 150 unseen and show 3 % ten times or more, here every
    token (but a window's worth at the ends) is seen once a pass."""

    def __init__(self, seed: int, n_tokens: int, block_size: int) -> None:
        self.seed, self.block_size = seed, block_size
        self.windows = max(1, (n_tokens - 1) // block_size - 1)  # as many as fit at every offset
        self.offsets = min(block_size, n_tokens - self.windows * block_size)

    def __call__(self, step: int, count: int) -> np.ndarray:
        """Start offsets of the `count` windows of step `step`'s batch."""
        passes, places = np.divmod(step * count + np.arange(count, dtype=np.int64), self.windows)
        starts = np.empty(count, dtype=np.int64)
        for p in np.unique(passes):
            offset, order = self._pass(int(p))
            here = passes == p
            starts[here] = offset + order[places[here]] * self.block_size
        return starts

    @functools.lru_cache(maxsize=2)  # a batch spans at most two passes; a pass's order is drawn once
    def _pass(self, p: int) -> tuple[int, np.ndarray]:
        rng = np.random.default_rng((self.seed, _SHUFFLED_STREAM, p))
        return int(rng.integers(self.offsets)), rng.permutation(self.windows)


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


def document_bounds(tokens: np.memmap, eot_id: int, chunk: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of every document that ends with EOT: tokens[start:end] is its text, tokens[end] its EOT.
    Found a chunk at a time, so a corpus larger than RAM works."""
    ends = np.concatenate([np.flatnonzero(tokens[i:i + chunk] == eot_id) + i for i in range(0, len(tokens), chunk)]
                          or [np.zeros(0, dtype=np.int64)])
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    keep = ends > starts
    return starts[keep], ends[keep]


class ConditionedRows:
    """Instruction-conditioned pretraining (--instruct-share): a training row that is a whole story from its
    start, preceded by a request the story satisfies, in the chat template:

        <|user|>\\n{request}\\n<|assistant|>\\n{story}<|endoftext|>{the next documents, to fill the row}

    The request is drawn afresh each time a story is drawn (requests.story_request, training wordings only), from
    the part of the story the row holds, so every requested word and name is in the row; the loss skips the
    request, so the model learns to answer requests, not to write them. Row r of step s depends only on
    (seed, s, r), so runs stay repeatable and resumable."""

    def __init__(self, tokens: np.memmap, block_size: int, seed: int, share: float) -> None:
        self.tokens, self.block_size, self.seed, self.share = tokens, block_size, seed, share
        self.tokenizer = get_tokenizer()
        self.starts, self.ends = document_bounds(tokens, EOT_ID)
        if not len(self.starts):
            raise SlmError("--instruct-share needs documents separated by end-of-text; the train split has none")

    def row(self, step: int, index: int) -> tuple[np.ndarray, np.ndarray, dict] | None:
        """(ids, learn, constraints): block_size + 1 ids, learn False on the request, and what the request
        asks; None when eight draws gave no request short enough to leave the row its story's start."""
        rng = random.Random(f"{self.seed}:{step}:{index}")
        room = self.block_size * 3 // 8  # for the request; the story's first 5/8 of the row is always in it
        for _ in range(8):
            doc = rng.randrange(len(self.starts))
            start, end = int(self.starts[doc]), int(self.ends[doc])
            visible = self.tokenizer.decode(self.tokens[start:min(end, start + self.block_size - room)].tolist())
            made = story_request(story_facts(self.tokenizer.decode(self.tokens[start:end].tolist()), visible), rng)
            if made is None:
                continue
            prefix = self.tokenizer.encode(render_text([{"role": "user", "content": made[0]}],
                                                       add_generation_prompt=True))
            if len(prefix) <= room:
                break
        else:
            return None
        body = np.asarray(self.tokens[start:start + self.block_size + 1 - len(prefix)], dtype=np.int64)
        ids = np.concatenate([np.array(prefix, dtype=np.int64), body])
        if len(ids) < self.block_size + 1:  # the end of the corpus: wrap to its start, a document start too
            ids = np.concatenate([ids, np.asarray(self.tokens[:self.block_size + 1 - len(ids)], dtype=np.int64)])
        return ids, np.arange(self.block_size + 1) >= len(prefix), made[1]

    def batch(self, starts: np.ndarray, step: int, rows: list[int],
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """get_batch of the windows at `starts`, each (global batch row numbers `rows`) replaced by a
        conditioned row with probability `share`; targets are IGNORE_INDEX on the requests."""
        xs, ys = [], []
        for row, s in zip(rows, starts):
            drawn = np.random.default_rng((self.seed, step, row)).random() < self.share
            made = self.row(step, row) if drawn else None
            ids, learn = made[:2] if made else (np.asarray(self.tokens[s:s + self.block_size + 1], dtype=np.int64),
                                                np.ones(self.block_size + 1, bool))
            xs.append(ids[:-1])
            ys.append(np.where(learn[1:], ids[1:], IGNORE_INDEX))
        return torch.from_numpy(np.stack(xs)).to(device), torch.from_numpy(np.stack(ys)).to(device)


def share(items: Sequence, world: World) -> Sequence:
    """This process's consecutive slice of a global batch (whose size the world's size divides)."""
    per_process = len(items) // world.world_size
    return items[world.rank * per_process:(world.rank + 1) * per_process]


def micro_batches(starts: Sequence, size: int, window: Callable[[Sequence], Batch]) -> list[Batch]:
    """Consecutive micro-batches of `size` window starts, each made a batch by `window`."""
    return [window(starts[i:i + size]) for i in range(0, len(starts), size)]


class PretrainBatches:
    """Random windows of the training memmap; step s always gets the same global batch."""

    def __init__(self, data_dir: str, cfg: Config, device: torch.device, world: World = World()) -> None:
        self.tokens = open_split(data_dir, "train")
        check_fits(self.tokens, cfg.model.block_size, "train")
        self.cfg, self.device, self.world = cfg, device, world
        self.shuffled = (ShuffledWindows(cfg.train.seed, len(self.tokens), cfg.model.block_size)
                         if cfg.train.windows == "shuffled" else None)
        self.conditioned = (ConditionedRows(self.tokens, cfg.model.block_size, cfg.train.seed,
                                                 cfg.train.instruct_share) if cfg.train.instruct_share else None)

    def __call__(self, step: int) -> list[Batch]:
        """This process's micro-batches: its contiguous slice of the global batch, which depends only on
        (seed, step), so the run is the same whatever the number of processes."""
        t = self.cfg.train
        starts = (self.shuffled(step, t.batch_size) if self.shuffled is not None else
                  window_starts(t.seed, step, t.batch_size, len(self.tokens), self.cfg.model.block_size))
        mine = share(starts, self.world)
        first = self.world.rank * len(mine)
        if self.conditioned is not None:
            return [self.conditioned.batch(mine[i:i + t.micro_batch_size], step,
                                           list(range(first + i, first + i + t.micro_batch_size)), self.device)
                    for i in range(0, len(mine), t.micro_batch_size)]
        block_size = self.cfg.model.block_size
        return micro_batches(mine, t.micro_batch_size, lambda starts: get_batch(self.tokens, starts, block_size,
                                                                                self.device))


def validation_batches(data_dir: str, cfg: Config, device: torch.device) -> list[Batch]:
    tokens = open_split(data_dir, "validation")
    check_fits(tokens, cfg.model.block_size, "validation")
    t = cfg.train
    starts = validation_starts(t.seed, t.eval_batches * t.micro_batch_size, len(tokens), cfg.model.block_size)
    return micro_batches(starts, t.micro_batch_size,
                         lambda window: get_batch(tokens, window, cfg.model.block_size, device))


# ---- supervised fine-tuning windows -----------------------------------------------------------------

@dataclass(frozen=True)
class SftData:
    """Conversations rendered and packed into one stream, and the windows training reads from it."""

    ids: np.ndarray     # (N,) every conversation's ids, one after another
    mask: np.ndarray    # (N,) True where the token is one the model must learn to produce
    # (W,) window offsets: each conversation tiled every block_size tokens from its start, keeping the tiles
    # whose targets include some of that conversation's own assistant tokens
    starts: np.ndarray


def pack(conversations: list[list[Message]], block_size: int) -> SftData:
    rendered = [render(messages) for messages in conversations]
    ids = np.array([i for r in rendered for i in r[0]], dtype=np.int64)
    mask = np.array([m for r in rendered for m in r[1]], dtype=bool)
    learned = np.concatenate([[0], np.cumsum(mask)])  # learned[b] - learned[a]: assistant tokens in [a, b)
    starts, offset = [], 0
    for conversation_ids, _ in rendered:
        end = offset + len(conversation_ids)
        # The tile at s predicts tokens s+1 .. s+block_size; tiling every block_size predicts each once.
        starts += [s for s in range(offset, end - 1, block_size)
                   if learned[min(s + block_size + 1, end)] > learned[s + 1]]
        offset = end
    return SftData(ids, mask, np.array(starts, dtype=np.int64))


def masked_windows(data: SftData, starts: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (B, block_size) = window[:-1] and targets = window[1:], IGNORE_INDEX wherever the target is
    not an assistant token. A window runs on into the next conversations (packing); at the end of the
    stream it wraps to the start, where a conversation begins too."""
    offsets = starts[:, None] + np.arange(block_size + 1)  # (B, block_size + 1)
    ids = np.take(data.ids, offsets, mode="wrap")
    learn = np.take(data.mask, offsets, mode="wrap")
    return ids[:, :-1], np.where(learn[:, 1:], ids[:, 1:], IGNORE_INDEX)


class SftBatches:
    """Windows of the packed conversations for fine-tuning; like pretraining's, step s's global batch is a
    pure function of (seed, step), so a run is reproducible and needs no sampler state."""

    def __init__(self, data: SftData, cfg: Config, device: torch.device, world: World = World()) -> None:
        self.data, self.cfg, self.device, self.world = data, cfg, device, world

    def __call__(self, step: int) -> list[Batch]:
        """This process's micro-batches: its slice of the global batch."""
        t = self.cfg.train
        rng = np.random.default_rng((t.seed, step))
        starts = self.data.starts[rng.integers(0, len(self.data.starts), size=t.batch_size)]
        return micro_batches(share(starts, self.world), t.micro_batch_size, self.window)

    def first(self, count: int) -> list[Batch]:
        """The first `count` micro-batches of windows, in order: a fixed set for every evaluation to score."""
        t = self.cfg.train
        starts = self.data.starts[:count * t.micro_batch_size]
        return micro_batches(starts, t.micro_batch_size, self.window)

    def window(self, starts: np.ndarray) -> Batch:
        inputs, targets = masked_windows(self.data, starts, self.cfg.model.block_size)
        return torch.from_numpy(inputs).to(self.device), torch.from_numpy(targets).to(self.device)
