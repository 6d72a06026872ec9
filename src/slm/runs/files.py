"""The run folder's plain files: atomic writes, RUN/metrics.jsonl and the checkpoints' manifests.

Nothing here needs torch, so `slm runs` and `slm plot` read runs without loading it (about 3 s here).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from slm.errors import SlmError

MANIFEST = "manifest.json"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`, `.NAME.tmp-PID`, to build a file or folder under; renamed over `path`
    when the block ends without an error, removed when it raises. A folder cannot be renamed over another, so an
    existing one first moves aside to `.NAME.old-PID` and is deleted last: a crash at any moment leaves the old one
    or the new one whole, never a mix, and the next write of `path` clears what the crash left (remove_stale).
    Flushing is the caller's."""
    tmp, old = (path.with_name(f".{path.name}.{kind}-{os.getpid()}") for kind in ("tmp", "old"))
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    _remove(tmp)  # left by a killed process whose pid this one reuses
    try:
        yield tmp
        if path.exists() and (path.is_dir() or tmp.is_dir()):
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        _remove(tmp)
        _remove(old)


def alive(pid: int) -> bool:
    """Whether process `pid` exists, whoever runs it."""
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def remove_stale(path: Path) -> None:
    """Clear what atomic_path left beside `path` in processes that died (killed, power cut) before renaming:
    their temporaries go, and a folder one had moved aside goes back in place if its replacement never came."""
    if os.name != "posix":  # there os.kill(pid, 0) would terminate the process: leave them
        return
    for sibling in path.parent.iterdir():
        match = re.fullmatch(r"\." + re.escape(path.name) + r"\.(tmp|old)-(\d+)", sibling.name)
        if match and not alive(int(match.group(2))):
            if match.group(1) == "old" and not path.exists():
                os.replace(sibling, path)
            else:
                _remove(sibling)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a temporary file beside it, flushed to disk, renamed over it."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def manifest_field(folder: Path, key: str) -> int | None:
    """An integer field (step, parameters) of a checkpoint's manifest, or None when it has none: no
    checkpoint yet, or one saved before manifests recorded that field."""
    try:
        return int(json.loads((folder / MANIFEST).read_text(encoding="utf-8"))[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_metrics(path: Path, strict: bool = False) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl ([] when there is none). A last line cut short by a kill (it has no
    newline yet) is skipped; so is any other line that is not a JSON object, unless `strict` makes that an
    error."""
    records = []
    lines = path.read_text(encoding="utf-8").split("\n") if path.is_file() else []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif strict and number < len(lines):
            raise SlmError(f"{path}, line {number}, is not a JSON object ({line[:60]!r}); metrics.jsonl holds "
                           f"one object per line, as slm train writes it")
    return records


def rewind_metrics(path: Path, step: int) -> None:
    """Drop the records a killed run wrote after `step` (they are about to be redone) and mark the resume,
    so metrics.jsonl reads as one run with each step recorded once."""
    kept = [record for record in read_metrics(path) if record.get("step", 0) <= step]
    kept.append({"event": "resumed", "step": step})
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))


def write_output(out: Path, force: bool, write) -> None:
    """`write(tmp)` builds the folder or file, which then replaces `out` whole (atomic_path)."""
    if out.exists() and not force:
        raise SlmError(f"{out} already exists; pass --force to replace it or choose another --out")
    with atomic_path(out) as tmp:
        write(tmp)


class MetricsLog:
    """Appends one JSON object per line to RUN/metrics.jsonl, flushed so a crash loses at most a line."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


SAMPLING_FILE = "sampling.json"
