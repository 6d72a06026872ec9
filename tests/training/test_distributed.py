"""1 process vs 2 processes (torchrun, gloo): the same global batches, so the same run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import losses, train, write_conversations
from slm.config import TrainConfig

MUON_LR = TrainConfig().muon_learning_rate  # the tiny preset keeps the default


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("extra", [
    [],
    # dropout masks are drawn per micro-batch of the global batch: each process draws its own, the same ones as
    # one process does (they were drawn alike on every process, so 2 processes trained another run than 1)
    ["--dropout", "0.2"],
    # fewer validation batches than processes: a process without one must not skip a collective (DDP's buffer
    # broadcast before a forward, with a compact head's buffers, deadlocked here)
    ["--vocab-head", "16", "--eval-batches", "1"],
    ["--optimizer", "muon"],
    # FSDP shards each matrix by rows: Muon must orthogonalise the whole matrix, not each process's rows
    # (which moved the losses by 1.3e-3 of themselves and the weights by 3e-2 here)
    ["--optimizer", "muon", "--fsdp"],
], ids=["plain", "dropout", "compact-head-one-eval-batch", "muon-ddp", "muon-fsdp"])
def test_two_processes_train_the_same_run_as_one(tmp_path, tiny_data, extra):
    one, two = tmp_path / "one", tmp_path / "two"
    train(tiny_data, one, *extra)  # --fsdp shards nothing in one process without torchrun
    result = train(tiny_data, two, "--nproc", "2", *extra)
    assert "torch.distributed.run" in result.stderr and "2 processes" in result.stderr

    assert len(losses(two, "loss")) == 12  # one record per step, written by rank 0 alone
    assert losses(two, "loss") == pytest.approx(losses(one, "loss"), rel=1e-5)
    assert losses(two, "val_loss") == pytest.approx(losses(one, "val_loss"), rel=1e-5)
    # Muon's Newton-Schulz iteration runs in bfloat16 whatever --dtype says: a gradient summed in another order
    # can round the other way there, and the iteration amplifies that in the matrix's weak directions, so the
    # weights agree to within Muon's learning rate (up to 2e-3 apart here, at 5e-3), not to float32's noise.
    atol = MUON_LR if "muon" in extra else 1e-5
    a, b = load_file(one / "last" / "model.safetensors"), load_file(two / "last" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=atol, rtol=1e-4)


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


def descendants(pid: int) -> set[int]:
    """Every live process started by `pid`, at any depth (torchrun starts its workers in sessions of their own,
    so a process group would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists()
            and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"}


def start_launcher(data, run, *extra, hang_after=None):
    """`slm train --nproc 2` in the background; returns (launcher, its torchrun and workers) once the workers
    have trained 7 steps, or, with `hang_after`, once the second process hangs after that step: it skips
    the step's stop check and waits for a message nobody sends, so the first process waits in that
    collective, where no signal handler runs."""
    args = ["train", "--data", str(data), "--out", str(run), "--preset", "tiny", "--max-steps", "12",
            "--eval-interval", "3", "--batch-size", "8", "--micro-batch-size", "2", "--sample-tokens", "0",
            "--device", "cpu", "--warmup-steps", "3", "--dtype", "float32", "--nproc", "2", *extra]
    env = {**os.environ, "SLM_TEST_HANG_AT_STEP": str(hang_after)} if hang_after else None
    launcher = subprocess.Popen([sys.executable, "-m", "slm", *args], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while not ((run / "metrics.jsonl").exists() and len(losses(run, "loss")) >= (hang_after or 7)):
        assert launcher.poll() is None and time.monotonic() < deadline, "the 2-process run ended before the stop"
        time.sleep(0.05)
    return launcher, descendants(launcher.pid)


def wait_all_gone(launcher, processes, seconds):
    launcher.wait(timeout=seconds)
    deadline = time.monotonic() + seconds
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(processes), f"processes of the run still running: {alive(processes)}"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("optimizer, sharding, resumed_on", [
    ("adamw", [], []), ("adamw", ["--fsdp"], []),
    # Muon (training.optimizers) keeps whole momentum matrices beside FSDP's shards: gathered to save, placed
    # back on resume
    ("muon", ["--fsdp"], ["--nproc", "2", "--fsdp"]),
], ids=["ddp", "fsdp", "muon-fsdp-resumed-sharded"])
def test_sigterm_to_the_launcher_stops_every_process_and_resume_continues_the_same_curve(tmp_path, tiny_data, optimizer,
                                                                                        sharding, resumed_on):
    reference, run = tmp_path / "reference", tmp_path / "run"
    train(tiny_data, reference, "--eval-interval", "3", "--optimizer", optimizer)
    launcher, processes = start_launcher(tiny_data, run, "--optimizer", optimizer, *sharding)
    assert len(processes) >= 3  # torchrun and its two workers
    launcher.send_signal(signal.SIGTERM)  # what `timeout` or a job scheduler does
    wait_all_gone(launcher, processes, 30)
    assert launcher.returncode == 128 + signal.SIGTERM, launcher.stderr.read()[-2000:]
    train(tiny_data, run, "--eval-interval", "3", "--optimizer", optimizer, "--resume", *resumed_on)
    assert losses(run, "loss") == pytest.approx(losses(reference, "loss"), rel=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_launcher_killed_outright_still_stops_every_process(tmp_path, tiny_data):
    run = tmp_path / "run"
    launcher, processes = start_launcher(tiny_data, run, "--max-steps", "100000")  # it would not end by itself
    launcher.kill()  # SIGKILL: no handler runs; torchrun gets SIGTERM as its parent dies, and stops its workers
    wait_all_gone(launcher, processes, 30)
    assert json.loads((run / "last" / "manifest.json").read_text())["step"] >= 7  # saved where they stopped


@pytest.mark.slow
@pytest.mark.distributed
def test_a_run_hung_in_a_collective_ends_within_the_collective_timeout_and_keeps_its_checkpoint(tmp_path, tiny_data):
    from slm.runs.checkpoint import verify

    run = tmp_path / "run"
    launcher, processes = start_launcher(tiny_data, run, "--collective-timeout", "10", hang_after=8)
    time.sleep(1)
    launcher.send_signal(signal.SIGTERM)
    wait_all_gone(launcher, processes, 25)
    assert "a collective waited more than --collective-timeout 10 s" in launcher.stderr.read()
    verify(run / "last")
    assert json.loads((run / "last" / "manifest.json").read_text())["step"] == 6


@pytest.mark.slow
@pytest.mark.distributed
def test_a_second_sigterm_ends_a_hung_run_at_once(tmp_path, tiny_data):
    run = tmp_path / "run"
    launcher, processes = start_launcher(tiny_data, run, "--collective-timeout", "600", hang_after=8)
    launcher.send_signal(signal.SIGTERM)
    time.sleep(1)
    launcher.send_signal(signal.SIGTERM)  # torchrun is killed, and its workers die with it
    wait_all_gone(launcher, processes, 15)
    assert launcher.returncode == 128 + signal.SIGTERM


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tmp_path, tiny_data):
    result = subprocess.run([sys.executable, "-m", "slm", "train", "--data", str(tiny_data), "--out",
                             str(tmp_path / "r"), "--preset", "tiny", "--batch-size", "6", "--micro-batch-size", "2",
                             "--device", "cpu", "--nproc", "2"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "must be a multiple of --micro-batch-size (2) x 2 processes" in result.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_a_compiled_sharded_fsdp_run_matches_one_process_and_its_checkpoint_loads_in_one(tmp_path, tiny_data,
                                                                                          monkeypatch):
    from slm.inference.generate import generate
    from slm.runs.checkpoint import load_model

    one, sharded = tmp_path / "one", tmp_path / "sharded"
    train(tiny_data, one, "--sample-tokens", "8")
    # compiled, as on a GPU by default: FSDP must shard the model before compile wraps it, or the checkpoint
    # gathers nothing and only the first process samples (the eager backend runs the same wrappers in seconds)
    monkeypatch.setenv("SLM_COMPILE_BACKEND", "eager")
    train(tiny_data, sharded, "--nproc", "2", "--fsdp", "--sample-tokens", "8", "--compile", "on")
    # FSDP reduce-scatters where DDP all-reduces: the same sums in another order, so float32 noise only.
    assert losses(sharded, "loss") == pytest.approx(losses(one, "loss"), rel=1e-5)
    assert losses(sharded, "val_loss") == pytest.approx(losses(one, "val_loss"), rel=1e-5)
    model, _, _ = load_model(sharded / "last")
    reference, _, _ = load_model(one / "last")
    ids = torch.tensor([[50256, 464, 3797]])
    torch.testing.assert_close(model(ids)[0], reference(ids)[0], atol=1e-4, rtol=1e-4)
    assert generate(model, ids, 10, temperature=0).shape == (1, 13)


@pytest.mark.slow
@pytest.mark.distributed
def test_finetune_on_two_processes_trains_the_same_run_as_one(tmp_path, tiny_run):
    data = write_conversations(tmp_path / "chat.jsonl", 64, seed=0)
    runs = {}
    for nproc in ("1", "2"):  # each process takes its own slice of every global batch, as in pretraining
        runs[nproc] = tmp_path / nproc
        args = ["finetune", str(tiny_run), "--data", str(data), "--out", str(runs[nproc]), "--max-steps", "6",
                "--eval-interval", "3", "--batch-size", "8", "--micro-batch-size", "2", "--device", "cpu",
                "--dtype", "float32", "--sample-tokens", "0", "--nproc", nproc]
        result = subprocess.run([sys.executable, "-m", "slm", *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
    assert "2 processes" in result.stderr
    assert losses(runs["2"], "loss") == pytest.approx(losses(runs["1"], "loss"), rel=1e-5)
    assert losses(runs["2"], "val_loss") == pytest.approx(losses(runs["1"], "val_loss"), rel=1e-5)
