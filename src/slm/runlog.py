"""Where a training run reports, behind one object so the loop only says what happened.

Every record goes to RUN/metrics.jsonl, and with --tensorboard its numbers also go to TensorBoard's event
files in RUN/tb/ (`tensorboard --logdir runs` shows every run). At each evaluation the sample goes to
TensorBoard as text, and RUN/curves.png and the model card RUN/README.md are redrawn. While it is open,
RUN/train.pid says the run is running (`slm runs`). Only the first process reports; on the others every
method does nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from slm import runfiles
from slm.card import write_card
from slm.config import Config
from slm.errors import SlmError
from slm.plot import refresh_curves
from slm.runs import PID_FILE

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
        process logged after it, as metrics.jsonl drops it (runfiles.rewind_metrics)."""
        self.run_dir, self.cfg, self.parameters, self.enabled = run_dir, cfg, parameters, enabled
        self.tensorboard = tensorboard_writer(run_dir / "tb", first_step) if enabled and cfg.train.tensorboard else None
        self.metrics = runfiles.MetricsLog(run_dir / "metrics.jsonl") if enabled else None
        if enabled:
            runfiles.write_text_atomic(run_dir / PID_FILE, str(os.getpid()))

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
            records = runfiles.read_metrics(self.run_dir / "metrics.jsonl")  # once, for both
            refresh_curves(self.run_dir, records)
            write_card(self.run_dir, self.cfg, self.parameters, records, sample)
        except OSError as err:  # a full disk should cost the figures, not the run
            print(f"slm: warning: could not update {self.run_dir}/curves.png or README.md: {err}", file=sys.stderr)

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        (self.run_dir / PID_FILE).unlink(missing_ok=True)
