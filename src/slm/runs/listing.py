"""`slm runs`: what each run folder says about itself, as one table.

A run's figures come from its files alone: metrics.jsonl (steps, tokens seen, validation losses, wall time,
and a final {"event": "finished"} record), config.toml (the model, matched against the presets) and a
checkpoint's manifest.json (the parameter count). While `slm train` writes to a run it keeps RUN/train.pid;
a run is *running* while that process lives, *finished* when its last record says so, else *interrupted*
(stopped by a signal, a crash or a kill: `slm train ... --resume` continues it).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slm.config import Config, preset_names, read_toml, resolve
from slm.errors import SlmError
from slm.runs.files import alive, manifest_field, read_metrics

PID_FILE = "train.pid"  # metrics.RunLog keeps it while training


def status(run_dir: Path, records: list[dict[str, Any]]) -> str:
    try:
        if alive(int((run_dir / PID_FILE).read_text(encoding="utf-8"))):
            return "running"
    except (OSError, ValueError):
        pass  # no pid file (or one cut short): nothing trains here now
    if records and records[-1].get("event") == "finished":
        return "finished"
    return "interrupted" if records else "not started"


@dataclass(frozen=True)
class Progress:
    """How far a run got, from its metrics.jsonl records."""

    steps: int
    tokens_seen: int
    wall_seconds: float
    best: dict[str, Any] | None  # the evaluation record with the lowest validation loss

    @classmethod
    def of(cls, records: list[dict[str, Any]]) -> Progress:
        evals = [r for r in records if r.get("val_loss") is not None]
        return cls(steps=max((r.get("step", 0) for r in records), default=0),
                   tokens_seen=max((r.get("tokens_seen", 0) for r in records), default=0),
                   wall_seconds=max((r.get("wall_seconds", 0.0) for r in records), default=0.0),
                   best=min(evals, key=lambda r: r["val_loss"]) if evals else None)


def preset_of(cfg: Config) -> str:
    """The preset whose model this run trains, or "custom"."""
    return next((name for name in preset_names() if resolve(name).model == cfg.model), "custom")


def parameters(run_dir: Path) -> int | None:
    counts = (manifest_field(run_dir / which, "parameters") for which in ("last", "best"))
    return next((n for n in counts if n), None)  # none: no checkpoint yet, or one from before manifests had it


def duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def find_runs(folder: Path) -> list[Path]:
    """Every run folder (one holding config.toml) at or under `folder`."""
    if not folder.is_dir():
        raise SlmError(f"{folder} is not a folder; pass the folder your runs are in (default: runs)")
    found = sorted(path.parent for path in folder.rglob("config.toml"))
    if not found:
        raise SlmError(f"no runs under {folder}: a run is a folder with config.toml, made by "
                       f"`slm train --out {folder}/NAME`")
    return found


def row(run_dir: Path, folder: Path) -> list[str]:
    """The table's cells for one run."""
    records = read_metrics(run_dir / "metrics.jsonl")
    progress = Progress.of(records)
    cfg = Config.from_dict(read_toml(run_dir / "config.toml"), str(run_dir / "config.toml"))
    n = parameters(run_dir)
    best = progress.best or {}
    return [str(run_dir.relative_to(folder)) if run_dir != folder else run_dir.name,
            preset_of(cfg), f"{n / 1e6:.2f}M" if n else "-", f"{progress.steps:,}", f"{progress.tokens_seen:,}",
            f"{best['val_loss']:.4f}" if best else "-", f"{best['val_bpb']:.4f}" if "val_bpb" in best else "-",
            duration(progress.wall_seconds) if progress.wall_seconds else "-", status(run_dir, records)]


COLUMNS = ("run", "preset", "parameters", "steps", "tokens seen", "best val loss", "bits per byte",
           "wall time", "status")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", nargs="?", default="runs", help="folder holding run folders (default: runs)")


def main(args) -> int:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    folder = Path(args.dir)
    table = Table(*COLUMNS, box=box.SIMPLE)
    for column in table.columns[2:8]:
        column.justify = "right"
    for run_dir in find_runs(folder):
        table.add_row(*row(run_dir, folder))
    Console(width=200 if not os.isatty(1) else None).print(table)  # a pipe gets whole rows, not wrapped ones
    return 0
