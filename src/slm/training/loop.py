"""The training loop, read top to bottom in `train`, with everything a step depends on in `TrainState` (state.py):

    loop = set_up(...)             # placement, data, model, wrapping, optimizer; a resume's saved state
    while not loop.finished():
        loop.step()                # the learning rate, gradients over the step's micro-batches, clip, update, log
        every eval_interval steps: loop.evaluate()   # validate, sample, save
"""

from __future__ import annotations

import argparse
import math
import random
import shlex
import signal
import sys
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from slm.config import (Config, TrainConfig, add_config_flags, add_config_source, add_run_out, check_resume_changes,
                        flags_from_args, resolve)
from slm.data.prepare import read_meta
from slm.data.tokenizer import get_tokenizer
from slm.data.windows import Batch, PretrainBatches, check_data_matches, open_split, token_counts, validation_batches
from slm.device import World, autocast, compile_model, keep_freed_memory, pick_dtype, should_compile
from slm.errors import SlmError
from slm.inference.generate import sample_text
from slm.model.gpt import GPT, IGNORE_INDEX
from slm.runs import checkpoint
from slm.runs.files import rewind_metrics, write_text_atomic
from slm.runs.listing import duration
from slm.runs.metrics import RunLog, StepCounter
from slm.training import distributed
from slm.training.launch import StopOnSignal, launch
from slm.training.optimizers import build_optimizers, set_learning_rate
from slm.training.state import TrainState, decay_progress, dropout_seeds, expected_steps, learning_rate, total_steps


def accumulate(model: torch.nn.Module, micro_batches: list[Batch], device: torch.device,
               dtype: torch.dtype, scaler: torch.amp.GradScaler, world: World = World(),
               mask_seeds: list[int] | None = None) -> float:
    """Forward and backward over this process's micro-batches; the gradients equal those of one batch holding
    every process's micro-batches. Each micro-batch's mean loss is weighted by its share of the step's counted
    targets over all processes (times world_size, as DDP averages the processes' gradients); DDP synchronises
    only on the last micro-batch. `mask_seeds` seeds dropout before each micro-batch. Returns the step's mean
    loss over all processes."""
    counted = distributed.total([sum(float((y != IGNORE_INDEX).sum()) for _, y in micro_batches)], world, device)[0]
    local = 0.0
    for i, (x, y) in enumerate(micro_batches):
        if mask_seeds is not None:
            torch.manual_seed(mask_seeds[i])
        with distributed.gradient_sync(model, world, i == len(micro_batches) - 1), autocast(device, dtype):
            _, loss = model(x, y)
            share = float((y != IGNORE_INDEX).sum()) / max(counted, 1.0)
            scaler.scale(loss * share * world.world_size).backward()
        local += loss.item() * share
    return distributed.total([local], world, device)[0]


def step_optimizer(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], scaler: torch.amp.GradScaler,
                   grad_clip: float) -> float:
    """Unscale (fp16), clip the true gradient norm, step unless it is non-finite, clear; returns the norm
    before clipping (inf or nan when the step was skipped). The scaler takes one torch optimizer at a time."""
    for optimizer in optimizers:
        scaler.unscale_(optimizer)  # clipping scaled gradients would clip at grad_clip * scale
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
    if math.isfinite(norm):
        for optimizer in optimizers:
            scaler.step(optimizer)
    scaler.update()  # under fp16 an overflow lowers the scale here
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return norm


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, batches: list[Batch], device: torch.device, dtype: torch.dtype,
                  world: World = World(), every_batch: bool = False) -> float:
    """Mean loss over a fixed list of batches, in eval mode (no dropout). The processes share the batches out,
    unless `every_batch` (FSDP: each forward is a collective, so every process scores every batch)."""
    was_training = model.training
    model.eval()
    losses = []
    for x, y in batches if every_batch else batches[world.rank::world.world_size]:
        with autocast(device, dtype):
            losses.append(model(x, y)[1].item())
    model.train(was_training)
    loss_sum, count = distributed.total([sum(losses), len(losses)], world, device)
    return loss_sum / count


@dataclass
class Trainer:
    """The modules and optimizers a run steps. `model` is the module that saves: the plain GPT whose weights
    the checkpoints hold and the samples come from (FSDP shards it in place). `trained` is the module that
    trains: `model` compiled, then wrapped by DDP. `evaluated` scores validation: compiled but never
    DDP-wrapped, as DDP's buffer broadcast before a forward is a collective, and the processes share the
    validation batches out, so some may have none."""

    model: GPT
    trained: torch.nn.Module
    evaluated: torch.nn.Module
    optimizers: list[torch.optim.Optimizer]  # build_optimizers': AdamW, and Muon with --optimizer muon
    scaler: torch.amp.GradScaler

    @property
    def sharded(self) -> bool:
        return distributed.is_sharded(self.model)


def build_trainer(model: GPT, t: TrainConfig, world: World, device: torch.device, dtype: torch.dtype) -> Trainer:
    """FSDP shards `model` in place first, so that compile traces the sharded module and the optimizer holds
    the sharded parameters; DDP wraps the compiled module."""
    if t.fsdp and distributed.initialized():  # under torchrun, even with one process
        distributed.shard(model)
    evaluated = compile_model(model) if should_compile(t.compile, device) else model
    trained = distributed.replicate(evaluated, device) if world.distributed and not t.fsdp else evaluated
    return Trainer(model, trained, evaluated, build_optimizers(model, t, device),
                   torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))


def build_model(cfg: Config, device: torch.device, init_model: GPT | None, resume_from: Path | None,
                world: World) -> GPT:
    """A new GPT (a compact head counts the training tokens), the fine-tune's `init_model`, or either with
    the weights of the checkpoint it resumes from."""
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    model = (init_model or GPT(cfg.model)).to(device).train()
    if cfg.model.vocab_head and init_model is None and resume_from is None:
        counts = token_counts(open_split(cfg.train.data, "train"), cfg.model.vocab_size)
        model.lm_head.set_frequencies(torch.from_numpy(counts).to(device))
        say(world, f"compact head: the {cfg.model.vocab_head:,} most frequent ids cover "
            f"{counts[model.lm_head.head_ids.cpu().numpy()].sum() / counts.sum():.2%} of the training tokens")
    if resume_from is not None:
        checkpoint.load_weights(model, resume_from)
    return model


def say(world: World, message: str) -> None:
    """A line on stderr above the progress bar, from the first process only."""
    if world.is_main:
        tqdm.write(message, file=sys.stderr)


@dataclass
class Loop:
    """A run in progress: what it trains, where it stands, what it reads, where it reports. train() repeats
    its `step` and, every eval_interval steps, `evaluate`, which saves."""

    cfg: Config
    run_dir: Path
    world: World
    device: torch.device
    dtype: torch.dtype
    trainer: Trainer
    state: TrainState
    batches: Callable[[int], list[Batch]]
    val_batches: list[Batch]
    bytes_per_token: float | None  # of the validation text, for bits per byte; None without a prepared folder
    steps: int  # the step budget
    log: RunLog
    progress: StepCounter
    clock_start: float = 0.0  # time.perf_counter() when the run began, earlier processes' wall time included

    def finished(self) -> bool:
        t = self.cfg.train
        return self.state.step >= self.steps or bool(t.max_minutes) and self.state.train_seconds >= t.max_minutes * 60

    def step(self) -> None:
        """One optimizer step at the scheduled learning rate, then its record and the progress bar."""
        t, state, trainer = self.cfg.train, self.state, self.trainer
        started = time.perf_counter()
        lr = learning_rate(state.step, decay_progress(state, t, self.steps), t)
        set_learning_rate(trainer.optimizers, lr, t)
        accum = t.micro_batches(self.world.world_size)
        tokens = t.batch_size * self.cfg.model.block_size  # per step, over all processes
        loss = accumulate(trainer.trained, self.batches(state.step), self.device, self.dtype, trainer.scaler,
                          self.world, dropout_seeds(t.seed, state.step, self.world, accum))
        grad_norm = step_optimizer(trainer.model, trainer.optimizers, trainer.scaler, t.grad_clip)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        state.step += 1
        state.tokens_seen += tokens
        state.train_seconds += seconds
        state.wall_seconds = time.perf_counter() - self.clock_start
        if state.step == t.warmup_steps:
            state.warmup_end_seconds = state.train_seconds
        record = {"step": state.step, "loss": _finite_or_none(loss), "lr": lr,
                  "grad_norm": _finite_or_none(grad_norm), "tokens_per_s": tokens / seconds,
                  "tokens_seen": state.tokens_seen, "wall_seconds": state.wall_seconds}
        if not math.isfinite(grad_norm):  # the update was not applied
            record["skipped"] = True
            state.skipped_steps += 1
            # Under fp16 an overflowing gradient with a finite loss is the grad scaler's normal business.
            if not (trainer.scaler.is_enabled() and math.isfinite(loss)):
                state.bad_steps_in_row += 1
        else:
            state.bad_steps_in_row = 0
        self.log.write(record)
        self.progress.update(expected_steps(state, t, self.steps), loss=loss, lr=lr,
                             tokens_per_s=tokens / seconds)
        if state.bad_steps_in_row >= t.max_bad_steps:
            raise SlmError(f"{state.bad_steps_in_row} steps in a row (up to step {state.step}) had a non-finite "
                           f"loss or gradient and were skipped; stopping. The last good checkpoint is in "
                           f"{self.run_dir / 'last'}: lower --learning-rate or check the data, then --resume")

    def evaluate(self) -> None:
        """The validation loss on the fixed batches, a sample, their record, then the checkpoints."""
        t, state, trainer = self.cfg.train, self.state, self.trainer
        val_loss = estimate_loss(trainer.evaluated, self.val_batches, self.device, self.dtype, self.world,
                                 every_batch=trainer.sharded)
        record: dict[str, Any] = {"step": state.step, "val_loss": val_loss, "tokens_seen": state.tokens_seen}
        if self.bytes_per_token:
            record["val_bpb"] = val_loss / math.log(2) / self.bytes_per_token
        improved = val_loss < state.best_val_loss
        state.best_val_loss = min(state.best_val_loss, val_loss)
        say(self.world, f"step {state.step}: val loss {val_loss:.4f}" + (" (best)" if improved else ""))
        sample = ""
        # Under FSDP every forward is a collective: all processes sample (the same seed, the same text).
        if t.sample_tokens and (self.world.is_main or trainer.sharded):
            trainer.model.eval()
            sample = sample_text(trainer.model, get_tokenizer(), "", t.sample_tokens, seed=t.seed).strip()
            say(self.world, "  " + sample.replace("\n", " "))
            trainer.model.train()
        self.log.evaluation(record, sample)  # before the checkpoint: a resume from it must not lose this record
        self.save(improved)

    def save(self, improved: bool) -> None:
        """RUN/last (and RUN/best when the validation loss improved), with what resuming needs."""
        model, trainer, state = self.trainer.model, self.trainer, self.state
        weights, optimizer_state = distributed.full_states(model, trainer.optimizers)  # every process takes part
        if self.world.is_main:
            identity = get_tokenizer().identity()
            trainer_state = {"state": state.state_dict(), "optimizer": optimizer_state,
                             "scaler": trainer.scaler.state_dict()}
            if improved:
                checkpoint.save(self.run_dir, "best", model, self.cfg, identity, step=state.step, weights=weights)
            checkpoint.save(self.run_dir, "last", model, self.cfg, identity, trainer_state, state.step,
                            self.cfg.train.keep_checkpoints, weights)
        distributed.barrier(self.world)

    def finish(self, stopped_by: int | None) -> TrainState:
        """The run's last line: how to resume it when a signal stopped it, else what it reached."""
        state, run_dir = self.state, self.run_dir
        if stopped_by is not None:
            command = " ".join(shlex.quote(arg) for arg in ["slm", *sys.argv[1:]] if arg != "--force")
            say(self.world, f"slm: stopped by {signal.Signals(stopped_by).name} at step {state.step}; the checkpoint "
                f"is in {run_dir / 'last'}. Resume with: {command}" + ("" if "--resume" in sys.argv else " --resume"))
            state.stopped_by = stopped_by
            return state
        bpb = (f" ({state.best_val_loss / math.log(2) / self.bytes_per_token:.4f} bits per byte)"
               if self.bytes_per_token else "")
        say(self.world, f"done: {state.step:,} steps, {state.tokens_seen:,} tokens in {duration(state.wall_seconds)}; "
            f"best val loss {state.best_val_loss:.4f}{bpb}; checkpoints in {run_dir}/best and {run_dir}/last, curves "
            f"and model card in {run_dir}/curves.png and README.md")
        return state


def set_up(cfg: Config, run_dir: Path, batches: Callable[[int], list[Batch]] | None, val_batches: list[Batch] | None,
           init_model: GPT | None, resume_from: Path | None) -> Loop:
    """Placement, data, model, wrapping, optimizer and, on a resume, the saved state; the batch arithmetic,
    printed once."""
    t = cfg.train
    world, device = distributed.setup(t.device, t.collective_timeout)
    if t.batch_size % (t.micro_batch_size * world.world_size):
        raise SlmError(f"--batch-size ({t.batch_size}) must be a multiple of --micro-batch-size "
                       f"({t.micro_batch_size}) x {world.world_size} processes")
    dtype = pick_dtype(t.dtype, device)
    meta = read_meta(t.data) if t.data else None
    if meta is not None:
        check_data_matches(meta, cfg, get_tokenizer().identity())
    batches = batches or PretrainBatches(t.data, cfg, device, world)
    val_batches = val_batches if val_batches is not None else validation_batches(t.data, cfg, device)
    validation = meta["splits"]["validation"] if meta else None
    keep_freed_memory()
    model = build_model(cfg, device, init_model, resume_from, world)
    trainer = build_trainer(model, t, world, device, dtype)
    state = TrainState()
    if resume_from is not None:
        saved = checkpoint.load_trainer_state(resume_from)
        distributed.load_optimizer_state(model, trainer.optimizers, saved["optimizer"])
        trainer.scaler.load_state_dict(saved["scaler"])
        state.load_state_dict(saved["state"])  # last: it restores the RNG states too
        if world.is_main:
            rewind_metrics(run_dir / "metrics.jsonl", state.step)
        say(world, f"resuming from {resume_from} at step {state.step}")
    tokens_per_step = t.batch_size * cfg.model.block_size
    steps = total_steps(t, tokens_per_step)
    say(world, f"GPT: {model.num_parameters() / 1e6:.2f}M parameters, {cfg.model.n_layer} layers x "
        f"{cfg.model.n_embd} wide, context {cfg.model.block_size} | device {device}, {str(dtype).split('.')[-1]}"
        + (f" | {world.world_size} processes" if world.distributed else ""))
    say(world, f"batch: {t.batch_size} sequences x {cfg.model.block_size} tokens = {tokens_per_step:,} tokens per "
        f"step = {world.world_size} process(es) x {t.micro_batches(world.world_size)} "
        f"micro-batches of {t.micro_batch_size} | up to {steps:,} steps"
        + (f" or {t.max_minutes:g} minutes" if t.max_minutes else ""))
    return Loop(cfg, run_dir, world, device, dtype, trainer, state, batches, val_batches,
                validation["bytes"] / max(validation["tokens"], 1) if meta else None, steps,
                RunLog(run_dir, cfg, model.num_parameters(), state.step, enabled=world.is_main),
                StepCounter(expected_steps(state, t, steps), state.step, enabled=world.is_main))


def train(cfg: Config, run_dir: Path, batches: Callable[[int], list[Batch]] | None = None,
          val_batches: list[Batch] | None = None, init_model: GPT | None = None,
          resume_from: Path | None = None) -> TrainState:
    """Train cfg's model into run_dir. `batches(step)` gives each step's micro-batches (default: windows of
    cfg.train.data); fine-tuning passes its own batches and a pretrained `init_model`; `resume_from` is a
    checkpoint folder whose model, optimizer and trainer state the run continues from."""
    loop = set_up(cfg, run_dir, batches, val_batches, init_model, resume_from)
    t, state, world = cfg.train, loop.state, loop.world
    loop.clock_start = time.perf_counter() - state.wall_seconds
    with (StopOnSignal() as stop, loop.progress, closing(loop.log),
          distributed.timeout_is_an_error(run_dir, t.collective_timeout)):
        while not loop.finished() and stop.received is None:
            loop.step()
            distributed.hang_if_testing(world, state.step)
            if world.distributed and distributed.total([float(stop.received or 0)], world, loop.device)[0]:
                stop.received = stop.received or signal.SIGTERM  # every process stops at the same step
            if state.step % t.eval_interval == 0 or loop.finished():
                loop.evaluate()
            elif stop.received is not None:
                loop.save(improved=False)
        state.wall_seconds = time.perf_counter() - loop.clock_start
        if stop.received is None:
            loop.log.write({"event": "finished", "step": state.step, "tokens_seen": state.tokens_seen,
                            "wall_seconds": state.wall_seconds})
    return loop.finish(stop.received)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN or Infinity


def start(cfg: Config, run_dir: Path, force: bool = False) -> TrainState:
    """A new run: check the data, make the run folder, record the resolved config, train."""
    if not cfg.train.data:
        raise SlmError("no training data: pass --data DIR (a folder made by `slm prepare`)")
    read_meta(cfg.train.data)
    world, _ = distributed.setup(cfg.train.device, cfg.train.collective_timeout)
    if world.is_main:
        checkpoint.prepare_run_dir(run_dir, force)
        write_text_atomic(run_dir / "config.toml", cfg.to_toml())
        _print_config(cfg)
    distributed.barrier(world)
    return train(cfg, run_dir)


def resume(run_dir: Path, preset: str | None = None, toml_path: str | None = None,
           flags: dict[str, dict[str, Any]] | None = None) -> TrainState:
    """Continue a run from its newest valid checkpoint (or, stopped before its first, start it again) under
    its recorded config, which the given preset, TOML and flags override in budgets and reporting only."""
    if not (run_dir / "config.toml").is_file():
        raise SlmError(f"{run_dir} holds no run to resume; start one without --resume")
    restart = not checkpoint.started(run_dir)
    folder = None if restart else checkpoint.resumable(run_dir)
    saved = resolve(toml_path=run_dir / "config.toml") if restart else checkpoint.read_header(folder)[0]
    cfg = resolve(preset, toml_path, flags, base=saved)
    check_resume_changes(saved, cfg)
    if restart:  # nothing to lose
        print(f"slm: {run_dir} stopped before its first checkpoint; starting it again", file=sys.stderr)
        return start(cfg, run_dir, force=True)
    world, _ = distributed.setup(cfg.train.device, cfg.train.collective_timeout)
    if world.is_main:
        write_text_atomic(run_dir / "config.toml", cfg.to_toml())
        _print_config(cfg)
    distributed.barrier(world)
    return train(cfg, run_dir, resume_from=folder)


def _print_config(cfg: Config) -> None:
    for section, values in cfg.to_dict().items():
        print(f"{section}: " + " ".join(f"{k}={v}" for k, v in values.items()), file=sys.stderr)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_out(p, "train")
    add_config_source(p)
    add_config_flags(p)


def main(args) -> int:
    if args.nproc:
        return launch(args.nproc, sys.argv[1:])
    flags = flags_from_args(args)
    if args.resume and args.force:
        raise SlmError("--resume continues a run and --force replaces it; pass only one")
    state = (resume(Path(args.out), args.preset, args.config, flags) if args.resume
             else start(resolve(args.preset, args.config, flags), Path(args.out), args.force))
    distributed.teardown()
    return 128 + state.stopped_by if state.stopped_by else 0
