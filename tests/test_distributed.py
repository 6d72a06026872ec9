"""1 process vs 2 processes (torchrun, gloo): the same global batches, so the same run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file


def train(data, run, *extra):
    args = ["train", "--data", str(data), "--out", str(run), "--preset", "tiny", "--max-steps", "12",
            "--eval-interval", "6", "--batch-size", "8", "--micro-batch-size", "2", "--sample-tokens", "0",
            "--device", "cpu", "--warmup-steps", "3", "--dtype", "float32", *extra]  # float32 unless extra says
    result = subprocess.run([sys.executable, "-m", "slm", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def losses(run, key):
    return [r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_train_the_same_run_as_one(tmp_path, tiny_data):
    one, two = tmp_path / "one", tmp_path / "two"
    train(tiny_data, one)
    result = train(tiny_data, two, "--nproc", "2")
    assert "torch.distributed.run" in result.stderr and "2 processes" in result.stderr

    assert len(losses(two, "loss")) == 12  # one record per step, written by rank 0 alone
    assert losses(two, "loss") == pytest.approx(losses(one, "loss"), rel=1e-5)
    assert losses(two, "val_loss") == pytest.approx(losses(one, "val_loss"), rel=1e-5)
    a, b = load_file(one / "last" / "model.safetensors"), load_file(two / "last" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4)


# bfloat16 keeps 8 significant bits, so one rounding moves a value by up to 2^-8 of it; 1 and 2 processes
# round the same products but sum the gradients in another order. The losses then agree to a bf16 rounding.
# Weights may differ more: AdamW moves a weight by about the learning rate whatever its gradient's size, so
# a gradient near zero whose sign the rounding flips moves the weight up to 2 x lr the other way each step.
BF16_ROUNDING = 2 ** -8


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_processes_match_one_in_bfloat16_where_auto_picks_it(tmp_path, tiny_data, monkeypatch, sharding):
    monkeypatch.setenv("SLM_CPU_BF16", "1")  # what `--dtype auto` does on a CPU with native bf16
    one, two = tmp_path / "one", tmp_path / "two"
    train(tiny_data, one, "--dtype", "auto")
    result = train(tiny_data, two, "--dtype", "auto", "--nproc", "2", *sharding)
    assert "bfloat16" in result.stderr
    for key in ("loss", "val_loss"):
        assert losses(two, key) == pytest.approx(losses(one, key), rel=BF16_ROUNDING)
    a, b = load_file(one / "last" / "model.safetensors"), load_file(two / "last" / "model.safetensors")
    lr, steps = 3e-3, 12  # the tiny preset's peak learning rate; train()'s --max-steps
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=2 * lr * steps, rtol=0)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_a_two_process_run_killed_and_resumed_in_one_process_continues_the_same_curve(tmp_path, tiny_data,
                                                                                       sharding):
    reference, run = tmp_path / "reference", tmp_path / "run"
    train(tiny_data, reference, "--eval-interval", "3")
    args = ["train", "--data", str(tiny_data), "--out", str(run), "--preset", "tiny", "--max-steps", "12",
            "--eval-interval", "3", "--batch-size", "8", "--micro-batch-size", "2", "--sample-tokens", "0",
            "--device", "cpu", "--warmup-steps", "3", "--dtype", "float32", "--nproc", "2", *sharding]
    launcher = subprocess.Popen([sys.executable, "-m", "slm", *args], stderr=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + 300
    while not ((run / "metrics.jsonl").exists() and len(losses(run, "loss")) >= 7):
        assert launcher.poll() is None and time.monotonic() < deadline, "the 2-process run ended before the kill"
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGKILL)  # torchrun and both workers
    launcher.wait()
    train(tiny_data, run, "--eval-interval", "3", "--resume")
    assert losses(run, "loss") == pytest.approx(losses(reference, "loss"), rel=1e-5)


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tmp_path, tiny_data):
    result = subprocess.run([sys.executable, "-m", "slm", "train", "--data", str(tiny_data), "--out",
                             str(tmp_path / "r"), "--preset", "tiny", "--batch-size", "6", "--micro-batch-size", "2",
                             "--device", "cpu", "--nproc", "2"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "must be a multiple of --micro-batch-size (2) x 2 processes" in result.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_a_sharded_fsdp_run_matches_one_process_and_its_checkpoint_loads_in_one(tmp_path, tiny_data):
    from slm.checkpoint import load_model
    from slm.generate import generate

    one, sharded = tmp_path / "one", tmp_path / "sharded"
    train(tiny_data, one, "--sample-tokens", "8")
    train(tiny_data, sharded, "--nproc", "2", "--fsdp", "--sample-tokens", "8")
    # FSDP reduce-scatters where DDP all-reduces: the same sums in another order, so float32 noise only.
    assert losses(sharded, "loss") == pytest.approx(losses(one, "loss"), rel=1e-5)
    assert losses(sharded, "val_loss") == pytest.approx(losses(one, "val_loss"), rel=1e-5)
    model, _, _ = load_model(sharded / "last")
    reference, _, _ = load_model(one / "last")
    ids = torch.tensor([[50256, 464, 3797]])
    torch.testing.assert_close(model(ids)[0], reference(ids)[0], atol=1e-4, rtol=1e-4)
    assert generate(model, ids, 10, temperature=0).shape == (1, 13)
