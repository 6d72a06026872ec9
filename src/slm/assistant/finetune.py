"""`slm finetune`: supervised fine-tuning of a trained run on chat data, through the one training loop.

The model and its config come from the base run's checkpoint. The training settings start from the base
run's, FINETUNE_DEFAULTS replace the ones a fine-tune should not inherit (a pretraining's length, time budget,
peak learning rate, its decay and weight decay), and the flags given win. The training loop runs on
windows.SftBatches, whose targets are IGNORE_INDEX except on the assistant's tokens, so every loss is the loss on
what the assistant says. The base model's validation loss on the same batches is step 0 of the new run's
metrics.jsonl: the first evaluation line says where fine-tuning started from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

from slm.config import (Config, add_checkpoint_choice, add_config_flags, add_run_out, check_resume_changes,
                        flags_from_args, resolve)
from slm.data.prepare import held_out
from slm.data.template import Message, read_conversations
from slm.data.tokenizer import get_tokenizer
from slm.data.windows import SftBatches, check_data_matches, pack
from slm.device import pick_dtype
from slm.errors import SlmError
from slm.runs import checkpoint
from slm.runs.files import write_text_atomic
from slm.runs.metrics import RunLog
from slm.training import distributed
from slm.training.launch import launch
from slm.training.loop import estimate_loss, train
from slm.training.state import TrainState

# The base run's optimizer stays (--optimizer changes it); Muon's peak, on AdamW's scale (optimizers.py), drops with it.
# weight_decay: the cpu preset's 0.5 is for ~5 epochs of a small corpus; fine-tunes were measured at 0.1
FINETUNE_DEFAULTS = {"max_steps": 300, "max_tokens": 0, "max_minutes": 0.0, "learning_rate": 3e-4,
                     "muon_learning_rate": 3e-4, "warmup_steps": 30, "eval_interval": 50, "instruct_share": 0.0,
                     "weight_decay": 0.1, "decay": "cosine"}


def finetune_config(base: Config, flags: dict[str, Any]) -> Config:
    """The base run's config with FINETUNE_DEFAULTS, then the given train flags, over its train section.
    The learning rate decays to a tenth of its peak unless --min-learning-rate says otherwise."""
    settings = {**FINETUNE_DEFAULTS, **flags}
    settings.setdefault("min_learning_rate", settings["learning_rate"] / 10)
    # No prepared data folder: the batches come from the chat file, which finetune.json records.
    without_data = dataclasses.replace(base, train=dataclasses.replace(base.train, data=""))
    return resolve(flags={"train": settings}, base=without_data)


def split(conversations: list[list[Message]], fraction: float, seed: int) -> tuple[list, list]:
    """(training, validation) conversations, each held out by a hash of (seed, index) like `slm prepare`."""
    if not 0 < fraction < 1:
        raise SlmError(f"--val-fraction must be above 0 and below 1 (got {fraction}); or pass --val-data FILE")
    parts: tuple[list, list] = ([], [])
    for index, conversation in enumerate(conversations):
        parts[held_out(seed, index, fraction)].append(conversation)
    if not parts[0] or not parts[1]:
        raise SlmError(f"holding out --val-fraction {fraction} of {len(conversations)} conversations left "
                       f"{len(parts[0])} for training and {len(parts[1])} for validation; change --val-fraction "
                       f"or pass --val-data FILE")
    return parts


def finetune(base_run: str | Path, data: str | Path, out: str | Path, val_data: str | Path | None = None,
             val_fraction: float = 0.05, flags: dict[str, Any] | None = None, which: str = "best",
             force: bool = False, resume: bool = False, keep: frozenset[str] = frozenset()) -> TrainState:
    """Fine-tune RUN/which on the conversations of `data` into the new run folder `out`; with `resume`,
    continue that fine-tune from its newest valid checkpoint (same data, only budgets may change), or start it
    again where it stopped before its first checkpoint: the same command then finishes it whenever it was killed."""
    folder = checkpoint.checkpoint_dir(base_run, which)
    out = Path(out)
    if out.resolve() == Path(base_run).resolve():
        raise SlmError(f"--out {out} is the base run; write the fine-tuned model to a new folder")
    if resume and force:
        raise SlmError("--resume continues a fine-tune and --force replaces it; pass only one")
    resume_from = checkpoint.resumable(out) if resume and checkpoint.started(out) else None
    base, base_tokenizer = checkpoint.read_header(resume_from or folder)
    check_data_matches({"tokenizer": get_tokenizer().identity()}, base, base_tokenizer)
    if resume_from:
        cfg = resolve(flags={"train": flags or {}}, base=base)
        check_resume_changes(base, cfg)
    else:
        cfg = finetune_config(base, flags or {})
    conversations = read_conversations(data)
    if val_data is not None:
        rows, val_rows = conversations, read_conversations(val_data)
    else:
        rows, val_rows = split(conversations, val_fraction, cfg.train.seed)
    train_sft, val_sft = pack(rows, cfg.model.block_size), pack(val_rows, cfg.model.block_size)
    world, device = distributed.setup(cfg.train.device, cfg.train.collective_timeout)
    if world.is_main:
        if not resume_from:  # now that the data is known good: --force must not delete a run for a typo in it
            checkpoint.prepare_run_dir(out, force or resume, keep)  # resume: what it replaces has no checkpoint
        write_text_atomic(out / "config.toml", cfg.to_toml())
    distributed.barrier(world)
    val_batches = SftBatches(val_sft, cfg, device).first(cfg.train.eval_batches)
    batches = SftBatches(train_sft, cfg, device, world)
    if resume_from:
        return train(cfg, out, batches, val_batches, resume_from=resume_from)

    model, _, _ = checkpoint.load_model(folder, device)
    base_loss = estimate_loss(model, val_batches, device, pick_dtype(cfg.train.dtype, device), world)
    if world.is_main:
        recipe = {"base": str(folder), "data": str(data), "val_data": str(val_data) if val_data else None,
                  "val_fraction": None if val_data else val_fraction,
                  "conversations": {"train": len(rows), "validation": len(val_rows)},
                  "windows": {"train": len(train_sft.starts), "validation": len(val_sft.starts)}}
        write_text_atomic(out / "finetune.json", json.dumps(recipe, indent=2) + "\n")
        with closing(RunLog(out, cfg, model.num_parameters(), first_step=0)) as log:  # TensorBoard's too
            log.write({"step": 0, "val_loss": base_loss, "tokens_seen": 0})
        t = cfg.train
        print(f"fine-tuning {folder} on {len(rows):,} conversations ({len(train_sft.starts):,} windows of "
              f"{cfg.model.block_size} tokens), validating on {len(val_rows):,}; up to {t.max_steps:,} steps, "
              f"learning rate {t.learning_rate:g} -> {t.min_learning_rate:g}; the base model's validation loss "
              f"on the assistant's tokens is {base_loss:.4f}", file=sys.stderr)
    return train(cfg, out, batches, val_batches, init_model=model)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_choice(p, run="the base run folder, written by `slm train`")
    p.add_argument("--data", required=True,
                   help='chat data: a .jsonl file of {"messages": [...]} or {"instruction", "input", "output"} rows')
    p.add_argument("--val-data", metavar="FILE", help="validation conversations (default: hold out --val-fraction)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of --data held out for validation when there is no --val-data (default: 0.05)")
    add_run_out(p, "fine-tune")
    add_config_flags(p, ("train",), exclude=("data",))


def main(args) -> int:
    if args.nproc:
        return launch(args.nproc, sys.argv[1:])
    state = finetune(args.run, args.data, args.out, args.val_data, args.val_fraction,
                     flags_from_args(args).get("train", {}), args.checkpoint, args.force, args.resume)
    distributed.teardown()
    return 128 + state.stopped_by if state.stopped_by else 0
