"""The run folder and its checkpoints, written atomically and loaded safely.

    RUN/config.toml       the resolved config; `slm train --config RUN/config.toml` re-runs it
    RUN/metrics.jsonl     one JSON object per optimizer step and per evaluation
    RUN/best/             the checkpoint with the lowest validation loss so far
    RUN/last/             the newest checkpoint, with optimizer and trainer state for resuming
    RUN/history/step-N/   older `last` checkpoints, the newest keep_checkpoints - 1 of them
    RUN/README.md         the model card; RUN/curves.png its figure; RUN/tb/ TensorBoard's logs (metrics.py)

A checkpoint folder holds `model.safetensors` (the weights, the tied head stored once; the config and
tokenizer identity in its metadata) and, for `last`, `trainer.pt` (optimizer and trainer state, read with
`torch.load(weights_only=True)`, so nothing in a checkpoint can run code), and `manifest.json` with the
step, the parameter count and a SHA-256 of each file, so a truncated or corrupted checkpoint is detected
before it is used. Each folder is written under a temporary name, flushed, then renamed into place: a crash
at any moment leaves the previous checkpoint intact (in `last/`, or moved to `history/` just before the new
one took its place).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slm.config import Config
from slm.errors import SlmError
from slm.model.gpt import GPT
from slm.runs.files import MANIFEST, atomic_path, fsync_dir, manifest_field

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
TRAINER = "trainer.pt"
HISTORY = "history"
TIED_HEAD = "lm_head.weight"


def prepare_run_dir(run_dir: Path, force: bool, keep: frozenset[str] = frozenset()) -> None:
    """Make RUN for a new run; never silently overwrite another run or unrelated files. Entries named in
    `keep` (what `slm run assistant` puts there before fine-tuning) may be there and stay."""
    present = [p for p in run_dir.iterdir() if p.name not in keep] if run_dir.is_dir() else []
    if present:
        if not (run_dir / "config.toml").exists():
            raise SlmError(f"{run_dir} exists and is not an slm run folder; choose an empty or new --out")
        if not force:
            raise SlmError(f"{run_dir} already holds a run; pass --force to overwrite it or choose another --out")
        for path in present:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save(run_dir: Path, name: str, model: GPT, cfg: Config, tokenizer: dict[str, Any],
         trainer_state: dict[str, Any] | None = None, step: int = 0, keep: int = 1,
         weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write RUN/name/ atomically: build it under a temporary name, then swap it in. The checkpoint it
    replaces moves to RUN/history/ when `keep` > 1, where only the newest keep - 1 stay. `weights` is the
    model's full state dict when the model itself holds only a shard of it (FSDP)."""
    final = run_dir / name
    try:
        with atomic_path(final) as tmp:
            tmp.mkdir()
            full = weights if weights is not None else model.state_dict()
            state = {k: v.detach().contiguous() for k, v in full.items() if k != TIED_HEAD}
            metadata = {"format_version": str(FORMAT_VERSION), "config": cfg.to_json(),
                        "tokenizer": json.dumps(tokenizer)}
            save_file(state, tmp / WEIGHTS, metadata=metadata)
            if trainer_state is not None:
                torch.save(trainer_state, tmp / TRAINER)
            files = {file.name: _sha256(file) for file in sorted(tmp.iterdir())}
            manifest = {"step": step, "parameters": model.num_parameters(), "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
            for file in tmp.iterdir():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(tmp)
            if keep > 1 and final.exists():  # kept in history rather than deleted once the new one is in place
                retired = run_dir / HISTORY / f"step-{manifest_field(final, 'step') or 0:08d}"
                retired.parent.mkdir(exist_ok=True)
                shutil.rmtree(retired, ignore_errors=True)
                os.replace(final, retired)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise SlmError(f"the disk filled while writing a checkpoint to {final}; the previous checkpoint "
                           f"is intact: free some space, then resume with --resume") from None
        raise
    fsync_dir(run_dir)
    if keep > 1:
        for old in sorted((run_dir / HISTORY).glob("step-*"), reverse=True)[keep - 1:]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def verify(folder: Path, names: tuple[str, ...] | None = None) -> None:
    """Raise SlmError unless every file of the checkpoint (or those in `names`) matches the hash its manifest
    recorded."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SlmError(f"{folder} has no readable {MANIFEST} ({err}); it is incomplete") from None
    for name in files if names is None else names:
        if not (folder / name).is_file() or _sha256(folder / name) != files.get(name):
            raise SlmError(f"{folder / name} is truncated or corrupt (its hash differs from {MANIFEST})")


def saved(run_dir: Path) -> list[Path]:
    """The run's resumable checkpoints on disk, newest first: RUN/last, then RUN/history's."""
    candidates = [run_dir / "last"] + sorted((run_dir / HISTORY).glob("step-*"), reverse=True)
    return [folder for folder in candidates if folder.exists()]


def started(run_dir: Path) -> bool:
    """Whether the run saved anything a resume must keep: a resumable checkpoint, or a `best` alone (which
    resumable() then explains it cannot continue from)."""
    return bool(saved(run_dir)) or (run_dir / "best").exists()


def resumable(run_dir: Path) -> Path:
    """The newest checkpoint of the run that verifies: RUN/last, else the newest in RUN/history."""
    problems = []
    for folder in saved(run_dir):
        try:
            verify(folder)
            if not (folder / TRAINER).is_file():
                raise SlmError(f"{folder} has no {TRAINER}")
            return folder
        except SlmError as err:
            problems.append(str(err))
            print(f"slm: warning: skipping {folder}: {err}", file=sys.stderr)
    raise SlmError(f"{run_dir} has no valid checkpoint to resume from"
                   + (f" ({'; '.join(problems)})" if problems else "") + "; start again with --force")


def read_header(checkpoint_dir: Path) -> tuple[Config, dict[str, Any]]:
    """The config and tokenizer identity recorded in a checkpoint, without loading tensors."""
    path = checkpoint_dir / WEIGHTS
    if not path.is_file():
        raise SlmError(f"no checkpoint at {checkpoint_dir} ({WEIGHTS} is missing); train a run first")
    try:
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise SlmError(f"{path} is corrupt or truncated ({err}); use the other checkpoint or retrain") from None
    version = int(metadata.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise SlmError(f"{path} was written by a newer slm (checkpoint format {version}, this slm reads "
                       f"up to {FORMAT_VERSION}); upgrade slm")
    if "config" not in metadata:
        raise SlmError(f"{path} has no slm config in its metadata; it was not written by slm")
    return Config.from_dict(json.loads(metadata["config"]), str(path)), json.loads(metadata.get("tokenizer", "{}"))


def load_weights(model: GPT, folder: Path) -> None:
    """Read a checkpoint's weights into a model of the same config (the tied head follows wte)."""
    try:
        state = load_file(folder / WEIGHTS)
    except (SafetensorError, OSError) as err:
        raise SlmError(f"{folder / WEIGHTS} is corrupt or truncated ({err}); retrain or use the "
                       f"other checkpoint") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) != ({TIED_HEAD} & set(model.state_dict())) or unexpected:
        raise SlmError(f"{folder / WEIGHTS} does not match its config (missing {missing}, unexpected {unexpected})")


def load_model(checkpoint_dir: Path, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[GPT, Config, dict[str, Any]]:
    """Rebuild the model of a checkpoint folder whose weights match its manifest; returns (model in eval mode,
    config, tokenizer identity).
    Generation loads its weights in the compute dtype (half the memory, no per-step casts); evaluation
    keeps float32 weights and autocasts, so norms and the loss accumulate in float32."""
    cfg, tokenizer = read_header(checkpoint_dir)
    try:
        verify(checkpoint_dir, (WEIGHTS,))  # trainer.pt is not read here, so not hashed either
    except SlmError as err:
        raise SlmError(f"{err}; use the run's other checkpoint (--checkpoint best or last) or retrain") from None
    model = GPT(cfg.model)
    load_weights(model, checkpoint_dir)
    return model.to(device=device, dtype=dtype).eval(), cfg, tokenizer


def load_trainer_state(checkpoint_dir: Path) -> dict[str, Any]:
    path = checkpoint_dir / TRAINER
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SlmError(f"{checkpoint_dir} has no {TRAINER}; only a run's last/ checkpoint can be resumed") from None
    except Exception as err:  # a truncated zip or pickle surfaces as several exception types
        raise SlmError(f"{path} is corrupt or truncated ({type(err).__name__}: {err})") from None


def checkpoint_dir(run: str | Path, which: str = "best") -> Path:
    """RUN/best or RUN/last; a run without `best` (e.g. stopped before its first evaluation) uses `last`."""
    run = Path(run)
    if not run.is_dir():
        raise SlmError(f"run folder {run} does not exist; train one with `slm train --out {run}`")
    chosen = run / which
    if not (chosen / WEIGHTS).is_file() and which == "best" and (run / "last" / WEIGHTS).is_file():
        chosen = run / "last"
    if not (chosen / WEIGHTS).is_file():
        raise SlmError(f"{run} has no {which} checkpoint yet; train it until its first evaluation")
    return chosen
