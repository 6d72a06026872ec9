"""`slm prepare`: stream a corpus as documents, tokenize it on every core, write train/validation bins.

Output folder: `train.bin` and `validation.bin` (flat token ids, read with `numpy.memmap`) and `meta.json`.
Whatever the source, a document is stripped of leading and trailing whitespace and dropped when empty;
its ids are followed by the EOT id. The folder is built under a temporary sibling name and renamed into
place only when complete, so a crash or a kill never leaves a folder that looks prepared.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import closing
from itertools import chain
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from slm.data.stories import demo_documents
from slm.data.tokenizer import EOT_TOKEN, get_tokenizer
from slm.errors import SlmError
from slm.runs.files import atomic_path

FORMAT_VERSION = 1
SPLITS = ("train", "validation")
TINYSTORIES = "roneneldan/TinyStories"
# Text per worker task: large enough that pickling and scheduling are noise, small enough that the
# chunks in flight (2 per worker) keep memory flat and a 7 MB file still spreads over the cores.
CHUNK_CHARS = 1 << 20
# In a folder, a file's split is the first word of its name: train-00000.parquet, valid.txt, val_1.jsonl.
SPLIT_PREFIX = re.compile(r"^(?:(?P<train>train)|(?P<validation>validation|valid|val)|(?P<test>test))(?![a-z])",
                          re.IGNORECASE)


class Chunk(NamedTuple):
    split: str
    ids: np.ndarray  # (tokens,) each document's ids followed by the EOT id
    documents: int
    bytes: int  # UTF-8 bytes of the documents' text, EOT not counted: the denominator of bits per byte


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size - 1 <= np.iinfo(np.uint16).max else np.uint32)


def held_out(seed: int, index: int, fraction: float) -> bool:
    """Whether document `index` goes to validation: a hash of (seed, index), the same on every run and
    machine (Python's hash() is randomized per process)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


# ---- reading documents ------------------------------------------------------------------------------

def _documents(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        text = text.strip()
        if text:
            yield text


def _decode(data: bytes, path: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SlmError(f"{path} is not UTF-8 text: invalid byte {data[err.start]:#04x} at byte offset "
                       f"{offset + err.start}; convert the file to UTF-8") from None


def _text(value: object, field: str, where: str) -> str:
    if value is None:  # a null text is a missing document, not a broken corpus
        return ""
    if not isinstance(value, str):
        raise SlmError(f"{where}: field {field!r} holds a {type(value).__name__}, not text; "
                       f"choose the text field with --text-field")
    try:
        value.encode("utf-8")  # JSON's \ud800 escapes make lone surrogates, which are not text
    except UnicodeEncodeError:
        raise SlmError(f"{where}: field {field!r} holds a lone surrogate (\\ud800-\\udfff), not text") from None
    return value


def _txt_texts(path: Path, _field: str) -> Iterator[str]:
    """Text between lines holding only <|endoftext|>, the format of TinyStories' own text release."""
    with open(path, "rb") as f:
        lines: list[bytes] = []
        start = offset = 0
        for line in f:
            offset += len(line)
            if line.strip() == EOT_TOKEN.encode():
                yield _decode(b"".join(lines), path, start)
                lines, start = [], offset
            else:
                lines.append(line)
        yield _decode(b"".join(lines), path, start)


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    with open(path, "rb") as f:
        offset = 0
        for number, line in enumerate(f, 1):
            text = _decode(line, path, offset)
            offset += len(line)
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise SlmError(f"{path} line {number} is not JSON ({err.msg}); "
                               f"write one JSON object per line") from None
            if not isinstance(row, dict) or field not in row:
                raise SlmError(f"{path} line {number} has no field {field!r}; "
                               f"choose the text field with --text-field")
            yield _text(row[field], field, f"{path} line {number}")


def _parquet_texts(path: Path, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowException as err:
        raise SlmError(f"{path} is not a readable parquet file ({err})") from None
    columns = parquet.schema_arrow.names
    if field not in columns:
        raise SlmError(f"{path} has no column {field!r} (columns: {', '.join(columns)}); "
                       f"choose the text field with --text-field")
    row = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=[field]):  # streams: one batch in memory
        for value in batch.column(0).to_pylist():
            row += 1
            yield _text(value, field, f"{path} row {row}")


READERS = {".txt": _txt_texts, ".jsonl": _jsonl_texts, ".parquet": _parquet_texts}


def iter_file_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Documents of one local .txt, .jsonl or .parquet file, read lazily."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise SlmError(f"cannot read {path}: expected a .txt, .jsonl or .parquet file")
    if not path.exists():  # not is_file(): a named pipe streams too
        raise SlmError(f"file {path} does not exist")
    return _documents(reader(path, text_field))


def _folder_splits(folder: Path, text_field: str) -> dict[str, Iterable[str]]:
    """Files named train*/valid*/val*/validation*/test* give those splits; any other file is training data.
    Test files stand in for validation only when there is no validation file, and are never trained on."""
    files: dict[str, list[Path]] = {"train": [], "validation": [], "test": []}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in READERS):
        match = SPLIT_PREFIX.match(path.name)
        files[match.lastgroup if match else "train"].append(path)
    if not any(files.values()):
        raise SlmError(f"folder {folder} holds no .txt, .jsonl or .parquet files")
    if not files["train"]:
        raise SlmError(f"folder {folder} has no training files; name them train*.txt/.jsonl/.parquet")
    chosen = {"train": files["train"], "validation": files["validation"] or files["test"]}
    return {split: chain.from_iterable(iter_file_documents(path, text_field) for path in paths)
            for split, paths in chosen.items() if paths}


def _hub_splits(name: str, config: str, text_field: str) -> dict[str, Iterable[str]]:
    """A Hugging Face dataset, streamed. NAME may be a hub id or a local folder `datasets` can read."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, config or None, streaming=True)
    except (OSError, ValueError) as err:  # not found, offline, unreadable files, a config name required
        raise SlmError(f"cannot load Hugging Face dataset {name!r} ({' '.join(str(err).split())}); "
                       f"a config is named as hf:NAME:CONFIG") from None
    if "train" not in dataset:
        raise SlmError(f"Hugging Face dataset {name!r} has no train split (splits: {', '.join(dataset)})")

    def texts(split: str) -> Iterator[str]:
        for batch in dataset[split].iter(batch_size=1024):
            if text_field not in batch:
                raise SlmError(f"Hugging Face dataset {name!r} has no field {text_field!r} (fields: "
                               f"{', '.join(batch)}); choose the text field with --text-field")
            yield from (_text(value, text_field, f"{name} {split}") for value in batch[text_field])

    chosen = {"train": "train", "validation": next((s for s in ("validation", "valid", "test") if s in dataset), None)}
    return {split: _documents(texts(name)) for split, name in chosen.items() if name}


def open_source(source: str, text_field: str = "text") -> tuple[str, dict[str, Iterable[str]]]:
    """(what meta.json records as the source, lazy documents per split); no "validation": hold some out."""
    if source == "demo":
        return source, {split: _documents(demo_documents(split)) for split in SPLITS}
    if source == "tinystories":
        return source, _hub_splits(TINYSTORIES, "", "text")
    if source.startswith("hf:"):
        name, _, config = source.removeprefix("hf:").partition(":")
        return source, _hub_splits(name, config, text_field)
    path = Path(source)
    if path.is_dir():
        return str(path.resolve()), _folder_splits(path, text_field)
    if path.suffix.lower() in READERS:
        return str(path.resolve()), {"train": iter_file_documents(path, text_field)}
    raise SlmError(f"unknown source {source!r}; use demo, tinystories, hf:NAME, or an existing "
                   f".txt/.jsonl/.parquet file or folder of them")


# ---- tokenizing -------------------------------------------------------------------------------------

def _encode_chunk(split: str, docs: list[str]) -> Chunk:
    tokenizer = get_tokenizer()  # cached: built once per worker process
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc))
        ids.append(tokenizer.eot_id)  # GPT-2's convention: EOT *after* each document
    return Chunk(split, np.array(ids, dtype=token_dtype(tokenizer.vocab_size)), len(docs),
                 sum(len(doc.encode("utf-8")) for doc in docs))


def _chunks(labelled: Iterable[tuple[str, str]]) -> Iterator[tuple[str, list[str]]]:
    """Group (split, document) pairs into per-split lists of about CHUNK_CHARS, keeping each split's order."""
    pending: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    for split, doc in labelled:
        pending.setdefault(split, []).append(doc)
        sizes[split] = sizes.get(split, 0) + len(doc)
        if sizes[split] >= CHUNK_CHARS:
            yield split, pending.pop(split)
            sizes[split] = 0
    yield from pending.items()


def _tokenize(labelled: Iterable[tuple[str, str]], workers: int) -> Iterator[Chunk]:
    if workers == 1:  # in-process: no start-up cost for small inputs, and the obvious path to test against
        yield from (_encode_chunk(split, docs) for split, docs in _chunks(labelled))
        return
    # Not Pool.imap: its feeder thread reads the whole input ahead, so memory would grow with the corpus.
    # A bounded window of tasks keeps every core busy and memory flat; results come back in order.
    # Workers ignore Ctrl-C: the parent alone handles it, terminates them and removes the temporary folder.
    get_tokenizer()  # built before the fork, so forked workers inherit it instead of each building their own
    with multiprocessing.Pool(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        pending: deque = deque()
        for split, docs in _chunks(labelled):
            pending.append(pool.apply_async(_encode_chunk, (split, docs)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def tokenize_documents(docs: Iterable[str], workers: int = 0) -> Iterator[Chunk]:
    """Token ids of documents, EOT after each, as ordered chunks; workers=0 uses every core."""
    return _tokenize((("train", doc) for doc in docs), workers or _cores())


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _labelled(splits: dict[str, Iterable[str]], val_fraction: float, seed: int) -> Iterator[tuple[str, str]]:
    if "validation" in splits:
        yield from (("train", doc) for doc in splits["train"])
        yield from (("validation", doc) for doc in splits["validation"])
    else:  # whole documents, chosen by index, so a story never straddles train and validation
        for index, doc in enumerate(splits["train"]):
            yield ("validation" if held_out(seed, index, val_fraction) else "train"), doc


def _write_bins(folder: Path, source: str, splits: dict[str, Iterable[str]], val_fraction: float, seed: int,
               workers: int) -> dict:
    """Tokenize into folder/{train,validation}.bin and write folder/meta.json; returns the meta."""
    tokenizer = get_tokenizer()
    counts = {split: {"tokens": 0, "documents": 0, "bytes": 0} for split in SPLITS}
    start = time.perf_counter()
    with open(folder / "train.bin", "wb") as train, open(folder / "validation.bin", "wb") as validation, \
            tqdm(desc="prepare", unit=" docs", unit_scale=True, file=sys.stderr, disable=None) as bar, \
            closing(_tokenize(_labelled(splits, val_fraction, seed), workers)) as chunks:
        files = {"train": train, "validation": validation}
        for chunk in chunks:
            chunk.ids.tofile(files[chunk.split])
            for key, value in (("tokens", len(chunk.ids)), ("documents", chunk.documents), ("bytes", chunk.bytes)):
                counts[chunk.split][key] += value
            bar.update(chunk.documents)
            tokens = sum(c["tokens"] for c in counts.values())
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start) / 1e6:.2f}M tokens/s", refresh=False)
    if not counts["train"]["documents"]:
        raise SlmError(f"{source} has no training documents (empty after stripping whitespace)")
    if not counts["validation"]["documents"]:
        if "validation" in splits:
            raise SlmError(f"the validation split of {source} has no documents")
        raise SlmError(f"holding out --val-fraction {val_fraction} of {counts['train']['documents']} documents "
                       f"gave no validation documents; raise --val-fraction or provide a validation file")
    meta = {"format_version": FORMAT_VERSION, "tokenizer": tokenizer.identity(),
            "dtype": token_dtype(tokenizer.vocab_size).name, "source": source, "splits": counts}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def read_meta(folder: str | Path) -> dict:
    """meta.json of a prepared folder, checked against the bins beside it."""
    folder = Path(folder)
    path = folder / "meta.json"
    again = f"run `slm prepare SOURCE --out {folder} --force`"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SlmError(f"{folder} is not a prepared data folder (no meta.json); {again}") from None
    except (OSError, ValueError) as err:
        raise SlmError(f"{path} is unreadable ({err}); {again}") from None
    try:
        if meta["format_version"] != FORMAT_VERSION:
            raise SlmError(f"{path} has format_version {meta['format_version']}, this slm reads "
                           f"{FORMAT_VERSION}; {again}")
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in SPLITS:
            expected = meta["splits"][split]["tokens"] * itemsize
            bin_path = folder / f"{split}.bin"
            if not bin_path.is_file() or bin_path.stat().st_size != expected:
                raise SlmError(f"{bin_path} is missing or not the {expected} bytes meta.json promises; {again}")
    except (KeyError, TypeError) as err:
        raise SlmError(f"{path} is not a prepared folder's meta.json (bad or missing {err}); {again}") from None
    return meta


# ---- the command ------------------------------------------------------------------------------------

def prepare(source: str, out: str | Path, text_field: str = "text", val_fraction: float = 0.005, seed: int = 1337,
            workers: int = 0, force: bool = False) -> dict:
    """Tokenize `source` into the folder `out`, which appears whole or not at all; returns its meta."""
    if not 0 <= val_fraction < 1:
        raise SlmError(f"--val-fraction must be at least 0 and below 1 (got {val_fraction})")
    if workers < 0:
        raise SlmError(f"--workers must be 0 (every core) or more (got {workers})")
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise SlmError(f"--out {out} is a file, not a folder")
    if out.exists() and not force:
        raise SlmError(f"{out} already exists; pass --force to replace it")
    if out.exists() and Path(source).exists() and Path(source).resolve().is_relative_to(out):
        raise SlmError(f"--out {out} holds the source {source}; --force would delete it, so choose another --out")
    source, splits = open_source(source, text_field)
    workers = workers or _cores()
    get_tokenizer()  # ~1 s to build: before the clock, and before forking so that workers inherit it
    start = time.perf_counter()
    with atomic_path(out) as tmp:  # --force: the old folder goes only once the new one is complete
        tmp.mkdir()
        meta = _write_bins(tmp, source, splits, val_fraction, seed, workers)
    seconds = time.perf_counter() - start
    counts = meta["splits"]
    sizes = ", ".join(f"{split} {counts[split]['tokens']:,} tokens ({counts[split]['documents']:,} documents)"
                      for split in SPLITS)
    rate = sum(counts[split]["tokens"] for split in SPLITS) / seconds / 1e6
    print(f"prepared {out}: {sizes}; {rate:.2f}M tokens/s over {seconds:.1f} s with {workers} "
          f"worker{'s' * (workers > 1)}", file=sys.stderr)
    return meta


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="demo, tinystories, hf:NAME[:CONFIG], or a .txt/.jsonl/.parquet file "
                   "or a folder of them")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--text-field", default="text", help="field holding the text in JSONL/parquet/HF rows")
    p.add_argument("--val-fraction", type=float, default=0.005,
                   help="share of documents held out for validation when the source has no such split")
    p.add_argument("--seed", type=int, default=1337, help="seed of the validation hold-out")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: all cores)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")


def main(args: argparse.Namespace) -> int:
    prepare(args.source, args.out, args.text_field, args.val_fraction, args.seed, args.workers, args.force)
    return 0
