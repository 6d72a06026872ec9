import dataclasses

import pytest

from slm.config import TrainConfig
from slm.errors import SlmError
from slm.training.state import TrainState, expected_steps, learning_rate, total_steps

SCHEDULE = TrainConfig(learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=10, max_steps=110)


def test_learning_rate_warms_up_linearly_to_the_peak():
    assert learning_rate(0, 0.0, SCHEDULE) == pytest.approx(1e-4)
    assert learning_rate(4, 0.0, SCHEDULE) == pytest.approx(5e-4)
    assert learning_rate(SCHEDULE.warmup_steps, 0.0, SCHEDULE) == SCHEDULE.learning_rate


def test_the_progress_bar_expects_the_step_budget_or_where_the_time_budget_runs_out():
    by_steps, by_time = TrainConfig(max_steps=1000), TrainConfig(max_steps=1000, max_minutes=2)
    assert expected_steps(TrainState(step=10, train_seconds=60.0), by_steps, 1000) == 1000
    assert expected_steps(TrainState(), by_time, 1000) == 1000  # no pace measured yet
    assert expected_steps(TrainState(step=10, train_seconds=60.0), by_time, 1000) == 20  # 6 s a step, 60 s left
    assert expected_steps(TrainState(step=10, train_seconds=60.0), by_time, 15) == 15  # the steps run out first
    assert expected_steps(TrainState(step=30, train_seconds=125.0), by_time, 1000) == 30  # the time is up


def test_learning_rate_decays_by_cosine_to_the_floor_and_stays_there():
    assert learning_rate(60, 0.5, SCHEDULE) == pytest.approx((1e-3 + 1e-4) / 2)
    assert learning_rate(110, 1.0, SCHEDULE) == SCHEDULE.min_learning_rate
    assert learning_rate(500, 4.0, SCHEDULE) == SCHEDULE.min_learning_rate
    lrs = [learning_rate(s, (s - 10) / 100, SCHEDULE) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert min(lrs) >= SCHEDULE.min_learning_rate  # the floor is never above the peak nor undershot


def test_learning_rate_decays_linearly_to_the_floor_when_asked():
    linear = dataclasses.replace(SCHEDULE, decay="linear", min_learning_rate=0.0)
    assert learning_rate(35, 0.25, linear) == pytest.approx(0.75e-3)  # cosine: 0.85e-3
    assert learning_rate(110, 1.0, linear) == learning_rate(500, 4.0, linear) == 0.0
    with pytest.raises(SlmError, match="--decay must be one of cosine, linear"):
        TrainConfig(decay="step")


def test_token_budget_converts_to_steps():
    cfg = TrainConfig(max_steps=1000, max_tokens=10_000)
    assert total_steps(cfg, tokens_per_step=4096) == 3
    assert total_steps(TrainConfig(max_steps=5), 4096) == 5
