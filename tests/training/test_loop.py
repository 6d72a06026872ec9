import dataclasses
import math

import pytest
import torch

from conftest import tiny_config
from slm.config import ModelConfig, TrainConfig
from slm.model.gpt import GPT
from slm.runs import files
from slm.training.loop import accumulate, start, step_optimizer
from slm.training.optimizers import build_optimizers


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_k_micro_batches_give_the_gradients_of_one_batch_k_times_larger():
    cfg = ModelConfig(vocab_size=101, block_size=8, n_layer=2, n_head=2, n_embd=16)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 101, (8, 8), generator=g)
    y = torch.randint(0, 101, (8, 8), generator=g)
    y[0, :3] = -100
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(0)
    model = GPT(cfg)
    whole = accumulate(model, [(x, y)], torch.device("cpu"), torch.float32, scaler)
    expected = _grads(model)
    model.zero_grad()
    parts = accumulate(model, [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)], torch.device("cpu"),
                       torch.float32, scaler)
    assert parts == pytest.approx(whole, rel=1e-5)
    for a, b in zip(_grads(model), expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_gradients_are_clipped_after_unscaling_under_fp16():
    cfg = ModelConfig(vocab_size=101, block_size=8, n_layer=1, n_head=2, n_embd=16)
    x = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = GPT(cfg)
    plain = GPT(cfg)
    plain.load_state_dict(model.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    accumulate(model, [(x, x)], torch.device("cpu"), torch.float32, scaler)
    accumulate(plain, [(x, x)], torch.device("cpu"), torch.float32, torch.amp.GradScaler("cpu", enabled=False))
    true_norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), math.inf).item()
    optimizers = build_optimizers(model, TrainConfig(), torch.device("cpu"))
    norm = step_optimizer(model, optimizers, scaler, grad_clip=1e-3)
    assert norm == pytest.approx(true_norm, rel=1e-4)  # not 4096 times larger


def read_metrics(run):
    return files.read_metrics(run / "metrics.jsonl", strict=True)


def test_a_tiny_run_lowers_validation_loss_and_writes_its_files(tiny_run):
    records = read_metrics(tiny_run)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert all({"lr", "tokens_per_s", "grad_norm"} <= r.keys() for r in steps)
    assert [r["step"] for r in evals] == [15, 30]
    assert records[-1] == {"event": "finished", "step": 30, "tokens_seen": 30 * 8 * 32,
                           "wall_seconds": records[-1]["wall_seconds"]}
    assert 0 < records[-1]["wall_seconds"] >= max(r["wall_seconds"] for r in steps)
    assert evals[-1]["val_loss"] < math.log(50257) - 3
    for name in ("config.toml", "best/model.safetensors", "last/model.safetensors", "last/trainer.pt", "README.md",
                 "curves.png"):
        assert (tiny_run / name).is_file()


def test_the_schedule_advances_once_per_optimizer_step_not_per_micro_batch(tmp_path, tiny_data):
    cfg = tiny_config(tiny_data, micro_batch_size=2, max_steps=12, eval_interval=12, warmup_steps=4)
    assert cfg.train.micro_batches(processes=1) == 4
    start(cfg, tmp_path / "run")
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run") if "lr" in r]
    assert len(lrs) == 12
    assert lrs[:4] == pytest.approx([cfg.train.learning_rate * (s + 1) / 4 for s in range(4)])


def test_the_same_seed_gives_the_same_losses_in_either_precision_of_auto(tmp_path, tiny_data, auto_resolution,
                                                                         capsys):
    cfg = tiny_config(tiny_data, max_steps=6, eval_interval=6)
    start(cfg, tmp_path / "a")
    assert f"device cpu, {auto_resolution}" in capsys.readouterr().err
    start(cfg, tmp_path / "b")
    loss = lambda run: [r.get("loss", r.get("val_loss")) for r in read_metrics(run)]
    assert loss(tmp_path / "a") == loss(tmp_path / "b")


def test_a_compact_head_run_learns_and_its_model_generates(tmp_path, tiny_data, capsys):
    from slm.cli import main

    cfg = tiny_config(tiny_data, max_steps=12, eval_interval=6)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_head=16))
    start(cfg, tmp_path / "run")
    evals = [r["val_loss"] for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert evals[-1] < math.log(50257) - 3
    assert "most frequent ids cover" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "run"), "--prompt", "Tom", "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("Tom")


def test_a_muon_run_learns(tmp_path, tiny_data, auto_resolution):
    start(tiny_config(tiny_data, max_steps=12, eval_interval=6, optimizer="muon"), tmp_path / "run")
    evals = [r["val_loss"] for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert evals[-1] < evals[0]
