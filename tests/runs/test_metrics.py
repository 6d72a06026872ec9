"""What a training run reports: TensorBoard event files that hold metrics.jsonl's numbers, and the model card."""

import pytest

from conftest import tiny_config
from slm.runs.files import read_metrics
from slm.training.loop import start

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def test_tensorboard_events_hold_the_logged_scalars_and_the_samples(tmp_path, tiny_data):
    run = tmp_path / "run"
    start(tiny_config(tiny_data, max_steps=6, eval_interval=3, sample_tokens=4, tensorboard=True), run)
    events = event_accumulator.EventAccumulator(str(run / "tb"), size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()
    records = read_metrics(run / "metrics.jsonl")
    for tag, key in [("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm"),
                     ("train/tokens_per_s", "tokens_per_s"), ("val/loss", "val_loss"), ("val/bpb", "val_bpb")]:
        logged = [(r["step"], r[key]) for r in records if key in r]
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [step for step, _ in logged], tag
        assert [s.value for s in scalars] == pytest.approx([value for _, value in logged], rel=1e-6), tag
    samples = events.Tensors("sample/text_summary")
    assert [s.step for s in samples] == [3, 6]
    assert all(s.tensor_proto.string_val[0].decode() for s in samples)


def test_without_the_flag_no_tensorboard_folder_is_made(tiny_run):
    assert not (tiny_run / "tb").exists()


def test_the_model_card_is_the_runs_readme_with_its_figures_and_curves(tiny_run):
    card = (tiny_run / "README.md").read_text()
    records = read_metrics(tiny_run / "metrics.jsonl")
    best = min((r for r in records if "val_loss" in r), key=lambda r: r["val_loss"])
    assert card.startswith(f"# {tiny_run.name}\n")
    assert f"best loss {best['val_loss']:.4f} at step {best['step']}" in card and "7,680 tokens seen" in card
    assert "![training curves](curves.png)" in card and "| train | max_steps | 30 |" in card


def test_progress_in_a_file_or_pipe_is_a_plain_line_every_half_minute_not_a_redraw_per_step(capsys, monkeypatch):
    from slm.runs.metrics import StepCounter

    clock = [0.0]
    monkeypatch.setattr("slm.runs.metrics.time.monotonic", lambda: clock[0])
    with StepCounter(total=3000, initial=0) as progress:  # pytest's captured stderr is not a terminal
        for step in range(3000):
            clock[0] = step * 0.2  # 10 minutes at 5 steps/s
            progress.update(3000, loss=3.0, lr=1e-3, tokens_per_s=10_000)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 20  # the first step, then one per 30 s of the 600
    assert lines[1] == "step 151/3,000 | loss 3.000 | lr 1.00e-03 | 10,000 tokens/s | 9m26s left"
