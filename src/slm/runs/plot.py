"""`slm plot`: the training curves of one or more runs, drawn from their metrics.jsonl with matplotlib.

Four rows of panels: loss (training solid, validation dashed with dots), validation bits per byte, learning
rate, and training tokens/s; the left column against optimizer steps, the right against tokens seen. A run
keeps its colour in every panel and the legend names it. The figure is a `matplotlib.figure.Figure` rather
than pyplot's, so it needs no display and sets no global backend (PNG goes through the Agg renderer).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from slm.errors import SlmError
from slm.runs.files import atomic_path, read_metrics

CURVES = "curves.png"  # RUN/curves.png, refreshed at every evaluation
FIGSIZE = (11.0, 11.0)  # inches
DPI = 72                # 792 x 792 pixels: readable, and small enough to commit
ROWS = [  # (panel title, [(metrics key, line style)])
    ("loss (nats per token)", [("loss", "-"), ("val_loss", "--o")]),
    ("validation bits per byte", [("val_bpb", "-o")]),
    ("learning rate", [("lr", "-")]),
    ("training tokens/s", [("tokens_per_s", "-")]),
]
X_AXES = [("step", "optimizer step"), ("tokens_seen", "tokens seen")]


def read_run(path: str | Path) -> list[dict[str, Any]]:
    """The records of a run folder's metrics.jsonl (or of that file itself), with at least one step."""
    path = Path(path)
    metrics = path / "metrics.jsonl" if path.is_dir() else path
    if not path.exists():
        raise SlmError(f"{path} does not exist; pass a run folder made by `slm train` or its metrics.jsonl")
    if not metrics.is_file():
        raise SlmError(f"{path} has no metrics.jsonl; pass a run folder made by `slm train`")
    records = read_metrics(metrics, strict=True)
    if not any("loss" in r for r in records):
        raise SlmError(f"{metrics} records no training step yet; plot it after the run's first step")
    return records


def curves_figure(runs: dict[str, list[dict[str, Any]]]):
    """The figure of every panel for each named run's records (a matplotlib Figure)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    # Fixed margins: constrained layout would double the drawing time, paid at every evaluation.
    axes = fig.subplots(len(ROWS), len(X_AXES), squeeze=False,
                        gridspec_kw={"left": 0.07, "right": 0.98, "bottom": 0.05, "top": 0.97, "hspace": 0.4})
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for row, (title, lines) in enumerate(ROWS):
        for col, (x_key, x_label) in enumerate(X_AXES):
            ax = axes[row][col]
            for (name, records), colour in zip(runs.items(), colours):
                for key, style in lines:
                    points = [(r[x_key], _number(r[key])) for r in records if key in r and x_key in r]
                    if points:
                        xs, ys = zip(*points)
                        ax.plot(xs, ys, style, color=colour, markersize=3, linewidth=1,
                                label=name if (row, col, key) == (0, 0, "loss") else None)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(x_label, fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, title="solid: training, dashed: validation", title_fontsize=8)
    return fig


def _number(value: float | None) -> float:
    return float("nan") if value is None else value  # a skipped step's loss is null: a gap in the line


def save_figure(fig, out: Path) -> None:
    """Write the figure to `out` atomically, in the format its suffix names."""
    kind = out.suffix.lstrip(".").lower()
    if kind not in fig.canvas.get_supported_filetypes():
        raise SlmError(f"--out {out}: matplotlib cannot write {out.suffix or 'files without a suffix'}; "
                       f"use a .png, .svg or .pdf name")
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=kind)


def refresh_curves(run_dir: Path, records: list[dict[str, Any]]) -> None:
    """Redraw RUN/curves.png from the run's metrics.jsonl records."""
    save_figure(curves_figure({run_dir.name: records}), run_dir / CURVES)


def labels(paths: list[str]) -> list[str]:
    """Each run's folder name, or its path where two runs share a name."""
    names = [Path(p).name if Path(p).is_dir() else Path(p).parent.name for p in paths]
    return [name if names.count(name) == 1 else str(path) for name, path in zip(names, paths)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder made by `slm train` (or its metrics.jsonl)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="image to write (.png, .svg or .pdf)")


def main(args) -> int:
    out = Path(args.out)
    if not out.parent.is_dir():
        raise SlmError(f"--out {out}: the folder {out.parent} does not exist")
    runs = {label: read_run(path) for label, path in zip(labels(args.runs), args.runs)}
    save_figure(curves_figure(runs), out)
    print(f"plotted {len(runs)} run(s) to {out}")
    return 0
