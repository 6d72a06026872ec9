"""The training loop: one loop, read top to bottom, with everything a step depends on in `TrainState`.

    state = TrainState()                                   # step, tokens, best loss, RNG states
    while not finished:
        set the learning rate for this optimizer step
        accumulate gradients over the micro-batches of this step's global batch
        clip, step the optimizer, log; every eval_interval steps: validate, sample, save
"""

from __future__ import annotations

import math
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from slm import checkpoint, data, distributed, runfiles
from slm.config import Config, TrainConfig, check_resume_changes, flags_from_args, resolve
from slm.device import autocast, keep_freed_memory, pick_dtype, should_compile
from slm.distributed import World
from slm.errors import SlmError
from slm.model import GPT, IGNORE_INDEX
from slm.prepare import read_meta

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets), each (B, T)


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
    """Linear warm-up over the first warmup_steps, then cosine decay to the floor as progress goes 0 -> 1."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return cfg.min_learning_rate + coeff * (cfg.learning_rate - cfg.min_learning_rate)


def decay_progress(state: TrainState, cfg: TrainConfig, steps: int) -> float:
    """How far the decay after warm-up has gone: by steps, or by time when a time budget is set."""
    by_steps = (state.step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
    if not cfg.max_minutes:
        return by_steps
    budget = cfg.max_minutes * 60 - state.warmup_end_seconds
    return max(by_steps, (state.train_seconds - state.warmup_end_seconds) / max(budget, 1e-9))


def build_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices and embeddings only, not on biases or norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


def accumulate(model: torch.nn.Module, micro_batches: list[Batch], device: torch.device,
               dtype: torch.dtype, scaler: torch.amp.GradScaler, world: World = World()) -> float:
    """Forward and backward over this process's micro-batches; the gradients equal those of one batch holding
    every process's micro-batches. Each micro-batch's mean loss is weighted by its share of the step's counted
    targets over all processes (times world_size, as DDP averages the processes' gradients); DDP synchronises
    only on the last micro-batch. Returns the step's mean loss over all processes."""
    counted = distributed.total([sum(float((y != IGNORE_INDEX).sum()) for _, y in micro_batches)], world, device)[0]
    local = 0.0
    for i, (x, y) in enumerate(micro_batches):
        with distributed.gradient_sync(model, world, i == len(micro_batches) - 1), autocast(device, dtype):
            _, loss = model(x, y)
            share = float((y != IGNORE_INDEX).sum()) / max(counted, 1.0)
            scaler.scale(loss * share * world.world_size).backward()
        local += loss.item() * share
    return distributed.total([local], world, device)[0]


def step_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   grad_clip: float) -> float:
    """Unscale (fp16), clip the true gradient norm, step unless it is non-finite, clear; returns the norm
    before clipping (inf or nan when the step was skipped)."""
    scaler.unscale_(optimizer)  # clipping scaled gradients would clip at grad_clip * scale
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
    if math.isfinite(norm):
        scaler.step(optimizer)
    scaler.update()  # under fp16 an overflow lowers the scale here
    optimizer.zero_grad(set_to_none=True)
    return norm


class StopOnSignal:
    """Ctrl-C or SIGTERM asks the loop to save a checkpoint and stop after the current step; a second
    Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        print(f"\nslm: {signal.Signals(signum).name} received: saving a checkpoint after this step "
              "(press Ctrl-C again to quit at once)", file=sys.stderr)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, batches: list[Batch], device: torch.device, dtype: torch.dtype,
                  world: World = World()) -> float:
    """Mean loss over a fixed list of batches, in eval mode (no dropout); the processes share the batches."""
    was_training = model.training
    model.eval()
    losses = []
    # Under FSDP every forward is a collective, so each process scores every batch; else they share them.
    for x, y in batches if distributed.is_sharded(model) else batches[world.rank::world.world_size]:
        with autocast(device, dtype):
            losses.append(model(x, y)[1].item())
    model.train(was_training)
    loss_sum, count = distributed.total([sum(losses), len(losses)], world, device)
    return loss_sum / count


class PretrainBatches:
    """Random windows of the training memmap; step s always gets the same global batch."""

    def __init__(self, data_dir: str, cfg: Config, device: torch.device, world: World = World()) -> None:
        self.tokens = data.open_split(data_dir, "train")
        data.check_fits(self.tokens, cfg.model.block_size, "train")
        self.cfg, self.device, self.world = cfg, device, world
        self.conditioned = (data.ConditionedRows(self.tokens, cfg.model.block_size, cfg.train.seed,
                                                 cfg.train.instruct_share) if cfg.train.instruct_share else None)

    def __call__(self, step: int) -> list[Batch]:
        """This process's micro-batches: its contiguous slice of the global batch, which depends only on
        (seed, step), so the run is the same whatever the number of processes."""
        t = self.cfg.train
        starts = data.window_starts(t.seed, step, t.batch_size, len(self.tokens), self.cfg.model.block_size)
        per_process = t.batch_size // self.world.world_size
        mine = starts[self.world.rank * per_process:(self.world.rank + 1) * per_process]
        first = self.world.rank * per_process
        if self.conditioned is not None:
            return [self.conditioned.batch(mine[i:i + t.micro_batch_size], step,
                                           list(range(first + i, first + i + t.micro_batch_size)), self.device)
                    for i in range(0, per_process, t.micro_batch_size)]
        return [data.get_batch(self.tokens, mine[i:i + t.micro_batch_size], self.cfg.model.block_size, self.device)
                for i in range(0, per_process, t.micro_batch_size)]


def validation_batches(data_dir: str, cfg: Config, device: torch.device) -> list[Batch]:
    tokens = data.open_split(data_dir, "validation")
    data.check_fits(tokens, cfg.model.block_size, "validation")
    t = cfg.train
    starts = data.validation_starts(t.seed, t.eval_batches * t.micro_batch_size, len(tokens), cfg.model.block_size)
    return [data.get_batch(tokens, starts[i:i + t.micro_batch_size], cfg.model.block_size, device)
            for i in range(0, len(starts), t.micro_batch_size)]


def check_data_matches(meta: dict, cfg: Config, tokenizer_identity: dict) -> None:
    if meta["tokenizer"].get("vocab_hash") != tokenizer_identity["vocab_hash"]:
        raise SlmError(f"the data was prepared with tokenizer {meta['tokenizer'].get('name')!r} "
                       f"({meta['tokenizer'].get('vocab_hash')}), not this model's {tokenizer_identity['name']!r}; "
                       f"prepare it again")
    if meta["tokenizer"]["vocab_size"] > cfg.model.vocab_size:
        raise SlmError(f"the data has {meta['tokenizer']['vocab_size']} token ids but --vocab-size is "
                       f"{cfg.model.vocab_size}; raise --vocab-size to at least that")


def train(cfg: Config, run_dir: Path, batches: Callable[[int], list[Batch]] | None = None,
          val_batches: list[Batch] | None = None, init_model: GPT | None = None,
          resume_from: Path | None = None) -> TrainState:
    """Train cfg's model into run_dir. `batches(step)` gives each step's micro-batches (default: random
    windows of cfg.train.data); fine-tuning passes its own batches and a pretrained `init_model`;
    `resume_from` is a checkpoint folder whose model, optimizer and trainer state the run continues from."""
    from slm.generate import sample_text
    from slm.runlog import RunLog
    from slm.runs import duration
    from slm.tokenizer import get_tokenizer

    t = cfg.train
    world, device = distributed.setup(t.device)
    if t.batch_size % (t.micro_batch_size * world.world_size):
        raise SlmError(f"--batch-size ({t.batch_size}) must be a multiple of --micro-batch-size "
                       f"({t.micro_batch_size}) x {world.world_size} processes")
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
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed)
    raw_model = (init_model or GPT(cfg.model)).to(device).train()
    if cfg.model.vocab_head and init_model is None and resume_from is None:
        counts = data.token_counts(data.open_split(t.data, "train"), cfg.model.vocab_size)
        raw_model.lm_head.set_frequencies(torch.from_numpy(counts).to(device))
        say(f"compact head: the {cfg.model.vocab_head:,} most frequent ids cover "
            f"{counts[raw_model.lm_head.head_ids.cpu().numpy()].sum() / counts.sum():.2%} of the training tokens")
    saved = checkpoint.load_trainer_state(resume_from) if resume_from is not None else None
    if resume_from is not None:
        checkpoint.load_weights(raw_model, resume_from)
    # FSDP shards the model in place (raw_model included), so the optimizer is built after wrapping.
    compiled = torch.compile(raw_model) if should_compile(t.compile, device) else raw_model
    model = distributed.wrap(compiled, world, device, t.fsdp)
    optimizer = build_optimizer(raw_model, t, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    state = TrainState()
    if saved is not None:
        distributed.load_optimizer_state(raw_model, optimizer, saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        state.load_state_dict(saved["state"])  # last: it restores the RNG states too
        if world.is_main:
            runfiles.rewind_metrics(run_dir / "metrics.jsonl", state.step)
        say(f"resuming from {resume_from} at step {state.step}")

    tokens_per_step = t.batch_size * cfg.model.block_size
    steps = total_steps(t, tokens_per_step)
    say(f"GPT: {raw_model.num_parameters() / 1e6:.2f}M parameters, {cfg.model.n_layer} layers x "
        f"{cfg.model.n_embd} wide, context {cfg.model.block_size} | device {device}, {str(dtype).split('.')[-1]}"
        + (f" | {world.world_size} processes" if world.distributed else ""))
    accum = t.batch_size // (t.micro_batch_size * world.world_size)
    say(f"batch: {t.batch_size} sequences x {cfg.model.block_size} tokens = {tokens_per_step:,} tokens per "
        f"step = {world.world_size} process(es) x {accum} micro-batches of {t.micro_batch_size} | up to "
        f"{steps:,} steps" + (f" or {t.max_minutes:g} minutes" if t.max_minutes else ""))

    log = RunLog(run_dir, cfg, raw_model.num_parameters(), state.step, enabled=world.is_main)
    progress = tqdm(total=expected_steps(state, t, steps), initial=state.step, desc="train", unit="step",
                    file=sys.stderr, dynamic_ncols=True, disable=not world.is_main)

    def save(improved: bool) -> None:
        weights, optimizer_state = distributed.full_states(raw_model, optimizer)  # every process takes part
        if world.is_main:
            trainer_state = {"state": state.state_dict(), "optimizer": optimizer_state, "scaler": scaler.state_dict()}
            if improved:
                checkpoint.save(run_dir, "best", raw_model, cfg, tokenizer.identity(), step=state.step,
                                weights=weights)
            checkpoint.save(run_dir, "last", raw_model, cfg, tokenizer.identity(), trainer_state, state.step,
                            t.keep_checkpoints, weights)
        distributed.barrier(world)

    def evaluate_and_save() -> None:
        val_loss = estimate_loss(model, val_batches, device, dtype, world)
        record: dict[str, Any] = {"step": state.step, "val_loss": val_loss, "tokens_seen": state.tokens_seen}
        if bytes_per_token:
            record["val_bpb"] = bits_per_byte(val_loss)
        improved = val_loss < state.best_val_loss
        state.best_val_loss = min(state.best_val_loss, val_loss)
        say(f"step {state.step}: val loss {val_loss:.4f}" + (" (best)" if improved else ""))
        sample = ""
        # Under FSDP every forward is a collective: all processes sample (the same seed, the same text).
        if t.sample_tokens and (world.is_main or distributed.is_sharded(raw_model)):
            raw_model.eval()
            sample = sample_text(raw_model, tokenizer, "", t.sample_tokens, seed=t.seed).strip()
            say("  " + sample.replace("\n", " "))
            raw_model.train()
        log.evaluation(record, sample)  # before the checkpoint: a resume from it must not lose this record
        save(improved)

    def finished() -> bool:
        return state.step >= steps or bool(t.max_minutes) and state.train_seconds >= t.max_minutes * 60

    clock_start = time.perf_counter() - state.wall_seconds
    with StopOnSignal() as stop, progress, closing(log):
        while not finished() and stop.received is None:
            started = time.perf_counter()
            lr = learning_rate(state.step, decay_progress(state, t, steps), t)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = accumulate(model, batches(state.step), device, dtype, scaler, world)
            grad_norm = step_optimizer(raw_model, optimizer, scaler, t.grad_clip)
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
                if not (scaler.is_enabled() and math.isfinite(loss)):
                    state.bad_steps_in_row += 1
            else:
                state.bad_steps_in_row = 0
            log.write(record)
            progress.total = expected_steps(state, t, steps)
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / seconds:,.0f}")
            if state.bad_steps_in_row >= t.max_bad_steps:
                raise SlmError(f"{state.bad_steps_in_row} steps in a row (up to step {state.step}) had a non-finite "
                               f"loss or gradient and were skipped; stopping. The last good checkpoint is in "
                               f"{run_dir / 'last'}: lower --learning-rate or check the data, then --resume")
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


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN or Infinity


def start(cfg: Config, run_dir: Path, force: bool = False) -> TrainState:
    """A new run: check the data, make the run folder, record the resolved config, train."""
    if not cfg.train.data:
        raise SlmError("no training data: pass --data DIR (a folder made by `slm prepare`)")
    read_meta(cfg.train.data)
    world, _ = distributed.setup(cfg.train.device)
    if world.is_main:
        checkpoint.prepare_run_dir(run_dir, force)
        runfiles.write_text_atomic(run_dir / "config.toml", cfg.to_toml())
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
    world, _ = distributed.setup(cfg.train.device)
    if world.is_main:
        runfiles.write_text_atomic(run_dir / "config.toml", cfg.to_toml())
        _print_config(cfg)
    distributed.barrier(world)
    return train(cfg, run_dir, resume_from=folder)


def _print_config(cfg: Config) -> None:
    for section, values in cfg.to_dict().items():
        print(f"{section}: " + " ".join(f"{k}={v}" for k, v in values.items()), file=sys.stderr)


def launch(nproc: int, argv: list[str]) -> int:
    """`slm train --nproc N ...`: the same command under torchrun on this machine, nothing more."""
    if nproc < 1:
        raise SlmError(f"--nproc must be at least 1 (got {nproc})")
    rest = [arg for i, arg in enumerate(argv) if arg != "--nproc" and (i == 0 or argv[i - 1] != "--nproc")
            and not arg.startswith("--nproc=")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "slm", *rest]
    print("slm: running " + " ".join(shlex.quote(arg) for arg in command), file=sys.stderr)
    return subprocess.run(command).returncode


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
