"""Where a training run reports, behind one object so the loop only says what happened.

Every record goes to RUN/metrics.jsonl, and with --tensorboard its numbers also go to TensorBoard's event
files in RUN/tb/ (`tensorboard --logdir runs` shows every run). At each evaluation the sample goes to
TensorBoard as text, and RUN/curves.png and the model card RUN/README.md are redrawn. While it is open,
RUN/train.pid says the run is running (`slm runs`). Only the first process reports; on the others every
method does nothing.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from slm.config import Config
from slm.errors import SlmError
from slm.runs.card import CARD, model_card
from slm.runs.files import MetricsLog, read_metrics, write_text_atomic
from slm.runs.listing import PID_FILE, duration
from slm.runs.plot import refresh_curves

TENSORBOARD_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                    "tokens_per_s": "train/tokens_per_s", "val_loss": "val/loss", "val_bpb": "val/bpb"}


def tensorboard_writer(folder: Path, first_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SlmError("--tensorboard needs the tensorboard package: pip install 'slm[tensorboard]'") from None
    return SummaryWriter(str(folder), purge_step=first_step + 1)


class RunLog:
    def __init__(self, run_dir: Path, cfg: Config, parameters: int, first_step: int, enabled: bool = True) -> None:
        """`first_step` is the step the run starts or resumes from; TensorBoard hides whatever an earlier
        process logged after it, as metrics.jsonl drops it (files.rewind_metrics)."""
        self.run_dir, self.cfg, self.parameters, self.enabled = run_dir, cfg, parameters, enabled
        self.tensorboard = tensorboard_writer(run_dir / "tb", first_step) if enabled and cfg.train.tensorboard else None
        self.metrics = MetricsLog(run_dir / "metrics.jsonl") if enabled else None
        if enabled:
            write_text_atomic(run_dir / PID_FILE, str(os.getpid()))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.metrics.write(record)
        if self.tensorboard is not None:
            for key, tag in TENSORBOARD_TAGS.items():
                if record.get(key) is not None:
                    self.tensorboard.add_scalar(tag, record[key], record["step"])

    def evaluation(self, record: dict[str, Any], sample: str) -> None:
        """An evaluation's record and sample; redraws the curves and the card."""
        if not self.enabled:
            return
        self.write(record)
        if self.tensorboard is not None and sample:
            self.tensorboard.add_text("sample", sample, record["step"])
        try:
            records = read_metrics(self.run_dir / "metrics.jsonl")  # once, for both
            refresh_curves(self.run_dir, records)
            card = model_card(self.run_dir, self.cfg, self.parameters, records, sample)
            write_text_atomic(self.run_dir / CARD, card)
        except OSError as err:  # a full disk should cost the figures, not the run
            print(f"slm: warning: could not update {self.run_dir}/curves.png or README.md: {err}", file=sys.stderr)

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        (self.run_dir / PID_FILE).unlink(missing_ok=True)


class StepCounter:
    """The step counter on stderr. On a terminal, a live bar; in a file or a pipe, one plain line every
    LINE_SECONDS (a bar's carriage-return redraw per step would fill a 10-minute log with thousands)."""

    LINE_SECONDS = 30.0

    def __init__(self, total: int, initial: int, enabled: bool = True) -> None:
        self.enabled, self.step, self.total = enabled, initial, total
        self.started, self.first, self.last_line = time.monotonic(), initial, -math.inf
        self.bar = (tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr,
                         dynamic_ncols=True) if enabled and sys.stderr.isatty() else None)

    def update(self, total: int, loss: float, lr: float, tokens_per_s: float) -> None:
        """One more step; `total` is the step the run is now expected to end at."""
        self.step, self.total = self.step + 1, total
        if self.bar is not None:
            self.bar.total = total
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        elif self.enabled and time.monotonic() - self.last_line >= self.LINE_SECONDS:
            self.last_line = time.monotonic()
            per_step = (self.last_line - self.started) / max(self.step - self.first, 1)
            left = duration(per_step * max(total - self.step, 0))
            print(f"step {self.step:,}/{total:,} | loss {loss:.3f} | lr {lr:.2e} | {tokens_per_s:,.0f} tokens/s | "
                  f"{left} left", file=sys.stderr, flush=True)

    def __enter__(self) -> StepCounter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()
