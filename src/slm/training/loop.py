"""The training loop: one loop, read top to bottom, with everything a step depends on in `TrainState`.

    state = TrainState()                                   # step, tokens, best loss, RNG states
    while not finished:
        set the learning rate for this optimizer step
        accumulate gradients over the micro-batches of this step's global batch
        clip, step the optimizer, log; every eval_interval steps: validate, sample, save
"""

from __future__ import annotations

import argparse
import math
import random
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from slm.runs import checkpoint
from slm.training import distributed
from slm.data.windows import PretrainBatches, check_data_matches, open_split, token_counts, validation_batches
from slm.runs.files import rewind_metrics, write_text_atomic
from slm.config import (Config, TrainConfig, add_config_flags, add_config_source, add_run_out, check_resume_changes,
                        flags_from_args, resolve)
from slm.data.windows import Batch
from slm.device import World, autocast, compile_model, keep_freed_memory, pick_dtype, should_compile
from slm.errors import SlmError
from slm.training.launch import StopOnSignal, launch
from slm.model.gpt import GPT, IGNORE_INDEX
from slm.training.optimizers import build_optimizers, set_learning_rate
from slm.data.prepare import read_meta


@dataclass
class TrainState:
    """Everything the next step depends on besides the model and optimizer; saved in RUN/last/."""

    step: int = 0                      # optimizer steps taken
    tokens_seen: int = 0               # training tokens consumed, over all processes
    best_val_loss: float = math.inf
    train_seconds: float = 0.0         # time spent training, summed over resumes
    wall_seconds: float = 0.0          # the same plus evaluations and checkpoints: the run's wall time
    warmup_end_seconds: float = 0.0    # train_seconds when warm-up ended (a time budget decays after it)
    skipped_steps: int = 0             # steps whose non-finite loss or gradient was not applied
    bad_steps_in_row: int = 0
    rng: dict[str, Any] = field(default_factory=dict)
    stopped_by: int = 0                # the signal that stopped this process, 0 if none (not saved)

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        self.rng = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        return {k: v for k, v in asdict(self).items() if k != "stopped_by"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        random.setstate(_as_tuple(self.rng["python"]))
        name, keys, pos, has_gauss, gauss = self.rng["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(self.rng["torch"])
        if self.rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.rng["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def total_steps(cfg: TrainConfig, tokens_per_step: int) -> int:
    """The step budget: --max-steps, or fewer when --max-tokens runs out first."""
    if cfg.max_tokens:
        return min(cfg.max_steps, math.ceil(cfg.max_tokens / tokens_per_step))
    return cfg.max_steps


def expected_steps(state: TrainState, cfg: TrainConfig, steps: int) -> int:
    """The step the run should end at: the step budget, or the step where a time budget runs out at the mean
    pace so far (the progress bar's total, so its time left is right under --max-minutes too)."""
    if not cfg.max_minutes or not state.step:
        return steps
    left = max(cfg.max_minutes * 60 - state.train_seconds, 0.0)
    return min(steps, state.step + math.ceil(left / (state.train_seconds / state.step)))


def learning_rate(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warm-up over the first warmup_steps, then cosine or linear decay to the floor as progress goes
    0 -> 1."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.decay == "cosine" else 1.0 - progress
    return cfg.min_learning_rate + coeff * (cfg.learning_rate - cfg.min_learning_rate)


def decay_progress(state: TrainState, cfg: TrainConfig, steps: int) -> float:
    """How far the decay after warm-up has gone: by steps, or by time when a time budget is set."""
    by_steps = (state.step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
    if not cfg.max_minutes:
        return by_steps
    budget = cfg.max_minutes * 60 - state.warmup_end_seconds
    return max(by_steps, (state.train_seconds - state.warmup_end_seconds) / max(budget, 1e-9))


def dropout_seeds(seed: int, step: int, world: World, micro_batches: int) -> list[int]:
    """The dropout seed of each of this process's micro-batches: a function of (seed, step, the micro-batch's
    place in the global batch). So every process draws masks of its own, and a run draws the same masks
    whatever its number of processes and across a resume."""
    first = world.rank * micro_batches  # the processes hold consecutive slices of the global batch
    return [int(np.random.SeedSequence([seed, step, first + i]).generate_state(1)[0]) for i in range(micro_batches)]


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
    optimizers: list[torch.optim.Optimizer]  # optim.build_optimizers': AdamW, and Muon with --optimizer muon
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
                say: Callable[[str], None]) -> GPT:
    """A new GPT (a compact head counts the training tokens), the fine-tune's `init_model`, or either with
    the weights of the checkpoint it resumes from."""
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    model = (init_model or GPT(cfg.model)).to(device).train()
    if cfg.model.vocab_head and init_model is None and resume_from is None:
        counts = token_counts(open_split(cfg.train.data, "train"), cfg.model.vocab_size)
        model.lm_head.set_frequencies(torch.from_numpy(counts).to(device))
        say(f"compact head: the {cfg.model.vocab_head:,} most frequent ids cover "
            f"{counts[model.lm_head.head_ids.cpu().numpy()].sum() / counts.sum():.2%} of the training tokens")
    if resume_from is not None:
        checkpoint.load_weights(model, resume_from)
    return model


def train(cfg: Config, run_dir: Path, batches: Callable[[int], list[Batch]] | None = None,
          val_batches: list[Batch] | None = None, init_model: GPT | None = None,
          resume_from: Path | None = None) -> TrainState:
    """Train cfg's model into run_dir. `batches(step)` gives each step's micro-batches (default: random
    windows of cfg.train.data); fine-tuning passes its own batches and a pretrained `init_model`;
    `resume_from` is a checkpoint folder whose model, optimizer and trainer state the run continues from."""
    from slm.inference.generate import sample_text
    from slm.runs.metrics import Progress, RunLog
    from slm.runs.listing import duration
    from slm.data.tokenizer import get_tokenizer

    # ---- setup: placement, data, model, wrapping, optimizer, resume ----
    t = cfg.train
    world, device = distributed.setup(t.device, t.collective_timeout)
    if t.batch_size % (t.micro_batch_size * world.world_size):
        raise SlmError(f"--batch-size ({t.batch_size}) must be a multiple of --micro-batch-size "
                       f"({t.micro_batch_size}) x {world.world_size} processes")
    accum = t.batch_size // (t.micro_batch_size * world.world_size)
    dtype = pick_dtype(t.dtype, device)
    tokenizer = get_tokenizer()
    meta = read_meta(t.data) if t.data else None
    if meta is not None:
        check_data_matches(meta, cfg, tokenizer.identity())
    batches = batches or PretrainBatches(t.data, cfg, device, world)
    val_batches = val_batches if val_batches is not None else validation_batches(t.data, cfg, device)
    bytes_per_token = (meta["splits"]["validation"]["bytes"] / max(meta["splits"]["validation"]["tokens"], 1)
                       if meta else None)

    def bits_per_byte(loss: float) -> float:
        return loss / math.log(2) / bytes_per_token

    def say(message: str) -> None:  # once, from the first process
        if world.is_main:
            tqdm.write(message, file=sys.stderr)

    keep_freed_memory()
    model = build_model(cfg, device, init_model, resume_from, say)
    trainer = build_trainer(model, t, world, device, dtype)
    state = TrainState()
    if resume_from is not None:
        saved = checkpoint.load_trainer_state(resume_from)
        distributed.load_optimizer_state(model, trainer.optimizers, saved["optimizer"])
        trainer.scaler.load_state_dict(saved["scaler"])
        state.load_state_dict(saved["state"])  # last: it restores the RNG states too
        if world.is_main:
            rewind_metrics(run_dir / "metrics.jsonl", state.step)
        say(f"resuming from {resume_from} at step {state.step}")

    tokens_per_step = t.batch_size * cfg.model.block_size
    steps = total_steps(t, tokens_per_step)
    say(f"GPT: {model.num_parameters() / 1e6:.2f}M parameters, {cfg.model.n_layer} layers x "
        f"{cfg.model.n_embd} wide, context {cfg.model.block_size} | device {device}, {str(dtype).split('.')[-1]}"
        + (f" | {world.world_size} processes" if world.distributed else ""))
    say(f"batch: {t.batch_size} sequences x {cfg.model.block_size} tokens = {tokens_per_step:,} tokens per "
        f"step = {world.world_size} process(es) x {accum} micro-batches of {t.micro_batch_size} | up to "
        f"{steps:,} steps" + (f" or {t.max_minutes:g} minutes" if t.max_minutes else ""))
    log = RunLog(run_dir, cfg, model.num_parameters(), state.step, enabled=world.is_main)
    progress = Progress(expected_steps(state, t, steps), state.step, enabled=world.is_main)

    # ---- what an evaluation does ----
    def save(improved: bool) -> None:
        weights, optimizer_state = distributed.full_states(model, trainer.optimizers)  # every process takes part
        if world.is_main:
            trainer_state = {"state": state.state_dict(), "optimizer": optimizer_state,
                             "scaler": trainer.scaler.state_dict()}
            if improved:
                checkpoint.save(run_dir, "best", model, cfg, tokenizer.identity(), step=state.step, weights=weights)
            checkpoint.save(run_dir, "last", model, cfg, tokenizer.identity(), trainer_state, state.step,
                            t.keep_checkpoints, weights)
        distributed.barrier(world)

    def evaluate_and_save() -> None:
        val_loss = estimate_loss(trainer.evaluated, val_batches, device, dtype, world, every_batch=trainer.sharded)
        record: dict[str, Any] = {"step": state.step, "val_loss": val_loss, "tokens_seen": state.tokens_seen}
        if bytes_per_token:
            record["val_bpb"] = bits_per_byte(val_loss)
        improved = val_loss < state.best_val_loss
        state.best_val_loss = min(state.best_val_loss, val_loss)
        say(f"step {state.step}: val loss {val_loss:.4f}" + (" (best)" if improved else ""))
        sample = ""
        # Under FSDP every forward is a collective: all processes sample (the same seed, the same text).
        if t.sample_tokens and (world.is_main or trainer.sharded):
            model.eval()
            sample = sample_text(model, tokenizer, "", t.sample_tokens, seed=t.seed).strip()
            say("  " + sample.replace("\n", " "))
            model.train()
        log.evaluation(record, sample)  # before the checkpoint: a resume from it must not lose this record
        save(improved)

    def finished() -> bool:
        return state.step >= steps or bool(t.max_minutes) and state.train_seconds >= t.max_minutes * 60

    # ---- the loop ----
    clock_start = time.perf_counter() - state.wall_seconds
    with StopOnSignal() as stop, progress, closing(log), collective_timeout_is_an_error(run_dir, t):
        while not finished() and stop.received is None:
            started = time.perf_counter()
            lr = learning_rate(state.step, decay_progress(state, t, steps), t)
            set_learning_rate(trainer.optimizers, lr, t)
            loss = accumulate(trainer.trained, batches(state.step), device, dtype, trainer.scaler, world,
                              dropout_seeds(t.seed, state.step, world, accum))
            grad_norm = step_optimizer(model, trainer.optimizers, trainer.scaler, t.grad_clip)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            state.step += 1
            state.tokens_seen += tokens_per_step
            state.train_seconds += seconds
            state.wall_seconds = time.perf_counter() - clock_start
            if state.step == t.warmup_steps:
                state.warmup_end_seconds = state.train_seconds
            record = {"step": state.step, "loss": _finite_or_none(loss), "lr": lr,
                      "grad_norm": _finite_or_none(grad_norm), "tokens_per_s": tokens_per_step / seconds,
                      "tokens_seen": state.tokens_seen, "wall_seconds": state.wall_seconds}
            if not math.isfinite(grad_norm):  # the update was not applied
                record["skipped"] = True
                state.skipped_steps += 1
                # Under fp16 an overflowing gradient with a finite loss is the grad scaler's normal business.
                if not (trainer.scaler.is_enabled() and math.isfinite(loss)):
                    state.bad_steps_in_row += 1
            else:
                state.bad_steps_in_row = 0
            log.write(record)
            progress.update(expected_steps(state, t, steps), loss=loss, lr=lr, tokens_per_s=tokens_per_step / seconds)
            if state.bad_steps_in_row >= t.max_bad_steps:
                raise SlmError(f"{state.bad_steps_in_row} steps in a row (up to step {state.step}) had a non-finite "
                               f"loss or gradient and were skipped; stopping. The last good checkpoint is in "
                               f"{run_dir / 'last'}: lower --learning-rate or check the data, then --resume")
            distributed.hang_if_testing(world, state.step)
            if world.distributed and distributed.total([float(stop.received or 0)], world, device)[0]:
                stop.received = stop.received or signal.SIGTERM  # every process stops at the same step
            if state.step % t.eval_interval == 0 or finished():
                evaluate_and_save()
            elif stop.received is not None:
                save(improved=False)
        state.wall_seconds = time.perf_counter() - clock_start
        if stop.received is None:
            log.write({"event": "finished", "step": state.step, "tokens_seen": state.tokens_seen,
                       "wall_seconds": state.wall_seconds})
    if stop.received is not None:
        command = " ".join(shlex.quote(arg) for arg in ["slm", *sys.argv[1:]] if arg != "--force")
        say(f"slm: stopped by {signal.Signals(stop.received).name} at step {state.step}; the checkpoint is in "
            f"{run_dir / 'last'}. Resume with: {command}" + ("" if "--resume" in sys.argv else " --resume"))
        state.stopped_by = stop.received
        return state
    bpb = f" ({bits_per_byte(state.best_val_loss):.4f} bits per byte)" if bytes_per_token else ""
    say(f"done: {state.step:,} steps, {state.tokens_seen:,} tokens in {duration(state.wall_seconds)}; best val loss "
        f"{state.best_val_loss:.4f}{bpb}; checkpoints in {run_dir}/best and {run_dir}/last, curves and model card "
        f"in {run_dir}/curves.png and README.md")
    return state


@contextmanager
def collective_timeout_is_an_error(run_dir: Path, t: TrainConfig) -> Iterator[None]:
    """A collective that timed out means another process stopped or hung: one line, and where to resume."""
    try:
        yield
    except RuntimeError as err:
        if not distributed.is_collective_timeout(err):
            raise
        raise SlmError(f"a collective waited more than --collective-timeout {t.collective_timeout:g} s for another "
                       f"process, which stopped or hung; the last good checkpoint is in {run_dir / 'last'} "
                       f"(resume with --resume)") from None


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
    """Continue a run from its newest valid checkpoint; the checkpoint's config is the base that the given
    preset, TOML and flags apply over, and only budgets and reporting may change."""
    if not (run_dir / "config.toml").is_file():
        raise SlmError(f"{run_dir} holds no run to resume; start one without --resume")
    folder = checkpoint.resumable(run_dir)
    saved, _ = checkpoint.read_header(folder)
    cfg = resolve(preset, toml_path, flags, base=saved)
    check_resume_changes(saved, cfg)
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
    if args.resume:
        if args.force:
            raise SlmError("--resume continues a run and --force replaces it; pass only one")
        state = resume(Path(args.out), args.preset, args.config, flags)
    else:
        state = start(resolve(args.preset, args.config, flags), Path(args.out), args.force)
    distributed.teardown()
    return 128 + state.stopped_by if state.stopped_by else 0
