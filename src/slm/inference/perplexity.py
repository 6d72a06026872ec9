"""`slm eval`: the loss, perplexity and bits per byte of a trained model over a whole file.

The token stream is tiled into windows of block_size + 1 tokens that overlap by one token: window k feeds
tokens [k*block_size, (k+1)*block_size) and predicts the next token of each, so every token after the first
is predicted exactly once and the last, shorter window is included. The first predictions of a window see
little context, so the figures are a little worse than a sliding window would give, at 1/block_size of its
cost. Bits per byte divides by the UTF-8 bytes of the text, so models with different tokenizers compare.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from slm.config import add_checkpoint_choice, add_placement
from slm.data.prepare import iter_file_documents, read_meta, tokenize_documents
from slm.data.tokenizer import get_tokenizer
from slm.data.windows import check_data_matches, get_batch, open_split
from slm.device import autocast, keep_freed_memory, pick_device, pick_dtype
from slm.errors import SlmError
from slm.model.gpt import GPT
from slm.runs.checkpoint import checkpoint_dir, load_model


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """Summed cross-entropy in nats -> bits per byte of the original text."""
    return total_nats / math.log(2) / n_bytes


def windows(n_tokens: int, block_size: int, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """(start offsets, inputs per window) of each batch: full windows of block_size + 1 tokens, batch_size
    at a time, then the shorter last window alone when the stream does not end on a window boundary."""
    full_end = (n_tokens - 1) // block_size * block_size  # where the last full window's inputs end
    for first in range(0, full_end, batch_size * block_size):
        yield np.arange(first, min(first + batch_size * block_size, full_end), block_size), block_size
    if full_end < n_tokens - 1:
        yield np.array([full_end]), n_tokens - 1 - full_end


@torch.no_grad()
def evaluate_tokens(model: GPT, tokens: np.ndarray, batch_size: int, device: torch.device,
                    dtype: torch.dtype) -> tuple[float, int]:
    """(summed cross-entropy in nats, number of predicted tokens) of a model in eval mode over a stream."""
    total = 0.0
    with tqdm(total=len(tokens) - 1, desc="eval", unit="tok", unit_scale=True, file=sys.stderr,
              disable=None) as progress:
        for starts, length in windows(len(tokens), model.config.block_size, batch_size):
            x, y = get_batch(tokens, starts, length, device)  # (B, length) each
            with autocast(device, dtype):
                logits, _ = model(x)
            # Summed, not averaged, in float32: batches hold different numbers of predictions.
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
            progress.update(y.numel())
    return total, len(tokens) - 1


def prepared_tokens(folder: Path) -> tuple[np.ndarray, int, dict]:
    """The validation split of a prepared folder: (memmapped tokens, bytes of its text, tokenizer identity)."""
    meta = read_meta(folder)
    n_bytes = meta["splits"].get("validation", {}).get("bytes")
    if not n_bytes:
        raise SlmError(f"{folder}/meta.json records no byte count for the validation split; "
                       f"prepare the data again with `slm prepare ... --force`")
    return open_split(folder, "validation"), n_bytes, meta["tokenizer"]


def file_tokens(path: Path, text_field: str) -> tuple[np.ndarray, int, dict]:
    """A raw .txt/.jsonl file tokenized by prepare's own functions (documents stripped, EOT after each).
    The ids are held in memory, 2 bytes a token: an evaluation file is a validation set, not a corpus."""
    chunks = list(tokenize_documents(iter_file_documents(path, text_field)))
    tokens = np.concatenate([chunk.ids for chunk in chunks]) if chunks else np.zeros(0, dtype=np.uint16)
    return tokens, sum(chunk.bytes for chunk in chunks), get_tokenizer().identity()


def report(total_nats: float, n_predicted: int, n_bytes: int) -> dict[str, float | int]:
    loss = total_nats / n_predicted
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": bits_per_byte(total_nats, n_bytes),
            "tokens": n_predicted, "bytes": n_bytes}


def table(results: dict[str, float | int], checkpoint: Path, source: str) -> str:
    return "\n".join([
        f"{checkpoint} on {source}",
        f"  tokens         {results['tokens']:,} predicted",
        f"  bytes          {results['bytes']:,}",
        f"  loss           {results['loss']:.4f} nats per token",
        f"  perplexity     {results['perplexity']:.2f}",
        f"  bits per byte  {results['bits_per_byte']:.4f}",
    ])


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_choice(p)
    add_placement(p)
    p.add_argument("--data", required=True, help="a prepared folder (its validation split) or a .txt/.jsonl file")
    p.add_argument("--text-field", default="text", help="field holding the text in JSONL rows")
    p.add_argument("--micro-batch-size", type=int, default=16,
                   help="windows per forward pass: memory, not results (default: 16)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def main(args) -> int:
    if args.micro_batch_size < 1:
        raise SlmError(f"--micro-batch-size must be at least 1 (got {args.micro_batch_size})")
    chosen = checkpoint_dir(args.run, args.checkpoint)  # a wrong run fails before a long tokenization
    path = Path(args.data)
    if not path.exists():
        raise SlmError(f"--data {path} does not exist; pass a folder made by `slm prepare` or a .txt/.jsonl file")
    if path.is_dir():
        tokens, n_bytes, tokenizer = prepared_tokens(path)
        source = f"{path} (validation split)"
    else:
        tokens, n_bytes, tokenizer = file_tokens(path, args.text_field)
        source = str(path)
    if len(tokens) < 2:
        raise SlmError(f"{source} holds {len(tokens)} tokens; at least 2 are needed to predict one")
    device = pick_device(args.device)
    keep_freed_memory()
    model, cfg, model_tokenizer = load_model(chosen, device)
    check_data_matches({"tokenizer": tokenizer}, cfg, model_tokenizer)
    total_nats, n_predicted = evaluate_tokens(model, tokens, args.micro_batch_size, device,
                                              pick_dtype(args.dtype, device))
    results = report(total_nats, n_predicted, n_bytes)
    print(json.dumps(results) if args.json else table(results, chosen, source))
    return 0
