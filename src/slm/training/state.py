"""What a run's next step depends on besides the model and the optimizer (`TrainState`, saved in RUN/last/),
and the numbers computed from it: the step budget, the learning rate's schedule, dropout's seeds. The numeric
ones are pure functions, each tested at known points.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from slm.config import TrainConfig
from slm.device import World


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
