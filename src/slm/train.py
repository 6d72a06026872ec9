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
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from slm import checkpoint, data
from slm.config import Config, TrainConfig, flags_from_args, resolve
from slm.device import autocast, pick_device, pick_dtype
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
    warmup_end_seconds: float = 0.0    # train_seconds when warm-up ended (a time budget decays after it)
    rng: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        self.rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        random.setstate(_as_tuple(self.rng["python"]))
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
               dtype: torch.dtype, scaler: torch.amp.GradScaler) -> float:
    """Forward and backward over the micro-batches; gradients equal those of one batch holding them all.
    Each micro-batch's mean loss is weighted by its share of the step's counted targets."""
    counted = sum(int((y != IGNORE_INDEX).sum()) for _, y in micro_batches)
    total = 0.0
    for x, y in micro_batches:
        with autocast(device, dtype):
            _, loss = model(x, y)
        weight = int((y != IGNORE_INDEX).sum()) / max(counted, 1)
        scaler.scale(loss * weight).backward()
        total += loss.item() * weight
    return total


def step_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   grad_clip: float) -> float:
    """Unscale (fp16), clip the true gradient norm, step, clear; returns the norm before clipping."""
    scaler.unscale_(optimizer)  # clipping scaled gradients would clip at grad_clip * scale
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, batches: list[Batch], device: torch.device, dtype: torch.dtype) -> float:
    """Mean loss over a fixed list of batches, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    losses = []
    for x, y in batches:
        with autocast(device, dtype):
            losses.append(model(x, y)[1].item())
    model.train(was_training)
    return sum(losses) / len(losses)


class PretrainBatches:
    """Random windows of the training memmap; step s always gets the same global batch."""

    def __init__(self, data_dir: str, cfg: Config, device: torch.device) -> None:
        self.tokens = data.open_split(data_dir, "train")
        data.check_fits(self.tokens, cfg.model.block_size, "train")
        self.cfg, self.device = cfg, device

    def __call__(self, step: int) -> list[Batch]:
        t = self.cfg.train
        starts = data.window_starts(t.seed, step, t.batch_size, len(self.tokens), self.cfg.model.block_size)
        return [data.get_batch(self.tokens, starts[i:i + t.micro_batch_size], self.cfg.model.block_size, self.device)
                for i in range(0, t.batch_size, t.micro_batch_size)]


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
          val_batches: list[Batch] | None = None, init_model: GPT | None = None) -> TrainState:
    """Train cfg's model into run_dir. `batches(step)` gives each step's micro-batches (default: random
    windows of cfg.train.data); fine-tuning passes its own batches and a pretrained `init_model`."""
    from slm.generate import sample_text
    from slm.tokenizer import get_tokenizer

    t = cfg.train
    device = pick_device(t.device)
    dtype = pick_dtype(t.dtype, device)
    tokenizer = get_tokenizer()
    meta = read_meta(t.data) if t.data else None
    if meta is not None:
        check_data_matches(meta, cfg, tokenizer.identity())
    batches = batches or PretrainBatches(t.data, cfg, device)
    val_batches = val_batches if val_batches is not None else validation_batches(t.data, cfg, device)
    bytes_per_token = (meta["splits"]["validation"]["bytes"] / max(meta["splits"]["validation"]["tokens"], 1)
                       if meta else None)

    torch.manual_seed(t.seed)
    random.seed(t.seed)
    raw_model = (init_model or GPT(cfg.model)).to(device).train()
    model = torch.compile(raw_model) if t.compile else raw_model
    optimizer = build_optimizer(raw_model, t, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    state = TrainState()

    tokens_per_step = t.batch_size * cfg.model.block_size
    steps = total_steps(t, tokens_per_step)
    print(f"model: {raw_model.num_parameters() / 1e6:.2f}M parameters, {cfg.model.n_layer} layers x "
          f"{cfg.model.n_embd} wide, context {cfg.model.block_size} | device {device}, {str(dtype).split('.')[-1]}",
          file=sys.stderr)
    print(f"batch: {t.batch_size} sequences x {cfg.model.block_size} tokens = {tokens_per_step:,} tokens per "
          f"step = {t.grad_accum_steps} micro-batches of {t.micro_batch_size} | up to {steps:,} steps"
          + (f" or {t.max_minutes:g} minutes" if t.max_minutes else ""), file=sys.stderr)

    metrics = checkpoint.MetricsLog(run_dir / "metrics.jsonl")
    progress = tqdm(total=steps, initial=state.step, desc="train", unit="step", file=sys.stderr,
                    dynamic_ncols=True)

    def evaluate_and_save() -> None:
        val_loss = estimate_loss(model, val_batches, device, dtype)
        record: dict[str, Any] = {"step": state.step, "val_loss": val_loss, "tokens_seen": state.tokens_seen}
        if bytes_per_token:
            record["val_bpb"] = val_loss / math.log(2) / bytes_per_token
        improved = val_loss < state.best_val_loss
        state.best_val_loss = min(state.best_val_loss, val_loss)
        metrics.write(record)
        progress.write(f"step {state.step}: val loss {val_loss:.4f}" + (" (best)" if improved else ""))
        if t.sample_tokens:
            raw_model.eval()
            progress.write("  " + sample_text(raw_model, tokenizer, "", t.sample_tokens, seed=t.seed).strip())
            raw_model.train()
        trainer_state = {"state": state.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict()}
        checkpoint.save(run_dir, "last", raw_model, cfg, tokenizer.identity(), trainer_state)
        if improved:
            checkpoint.save(run_dir, "best", raw_model, cfg, tokenizer.identity())

    def finished() -> bool:
        return state.step >= steps or bool(t.max_minutes) and state.train_seconds >= t.max_minutes * 60

    while not finished():
        started = time.perf_counter()
        lr = learning_rate(state.step, decay_progress(state, t, steps), t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = accumulate(model, batches(state.step), device, dtype, scaler)
        grad_norm = step_optimizer(raw_model, optimizer, scaler, t.grad_clip)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        state.step += 1
        state.tokens_seen += tokens_per_step
        state.train_seconds += seconds
        if state.step == t.warmup_steps:
            state.warmup_end_seconds = state.train_seconds
        metrics.write({"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "tokens_per_s": tokens_per_step / seconds, "tokens_seen": state.tokens_seen})
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / seconds:,.0f}")
        if state.step % t.eval_interval == 0 or finished():
            evaluate_and_save()
    progress.close()
    metrics.close()
    print(f"done: {state.step} steps, {state.tokens_seen:,} tokens in {state.train_seconds / 60:.1f} min; "
          f"best val loss {state.best_val_loss:.4f}; checkpoints in {run_dir}/best and {run_dir}/last",
          file=sys.stderr)
    return state


def start(cfg: Config, run_dir: Path, force: bool = False) -> TrainState:
    """A new run: check the data, make the run folder, record the resolved config, train."""
    if not cfg.train.data:
        raise SlmError("no training data: pass --data DIR (a folder made by `slm prepare`)")
    read_meta(cfg.train.data)
    checkpoint.prepare_run_dir(run_dir, force)
    checkpoint.write_text_atomic(run_dir / "config.toml", cfg.to_toml())
    for section, values in cfg.to_dict().items():
        print(f"{section}: " + " ".join(f"{k}={v}" for k, v in values.items()), file=sys.stderr)
    return train(cfg, run_dir)


def main(args) -> int:
    start(resolve(args.preset, args.config, flags_from_args(args)), Path(args.out), args.force)
    return 0
