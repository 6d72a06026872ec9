"""Training that survives interruption exactly: kill, resume, compare with the run that was never stopped."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config, write_prepared
from slm.cli import main
from slm.data.windows import PretrainBatches
from slm.errors import SlmError
from slm.runs import checkpoint
from slm.runs.listing import PID_FILE, status
from slm.training.loop import resume, start


def train_args(data, run, *extra):
    return ["train", "--data", str(data), "--out", str(run), "--preset", "tiny", "--max-steps", "40",
            "--eval-interval", "5", "--sample-tokens", "0", "--device", "cpu", "--warmup-steps", "5", *extra]


def slm(*argv):
    return [sys.executable, "-m", "slm", *argv]


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def step_losses(run):
    return {r["step"]: r["loss"] for r in records(run) if "loss" in r}


def wait_for_step(run, step, process, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "training ended before it could be killed"
        if (run / "metrics.jsonl").exists() and max(step_losses(run) or [0]) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def assert_same_weights(a, b):
    wa, wb = load_file(a / "last" / "model.safetensors"), load_file(b / "last" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.mark.slow
# Muon's state is a momentum buffer per matrix, AdamW's two moments and a step count: each must come back.
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_run_killed_at_a_random_step_and_resumed_ends_bit_identical(tmp_path, tiny_data, auto_resolution,
                                                                      optimizer):
    reference = tmp_path / "reference"
    args = ["--optimizer", optimizer]
    result = subprocess.run(slm(*train_args(tiny_data, reference, *args)), check=True, capture_output=True, text=True)
    assert f"device cpu, {auto_resolution}" in result.stderr  # --dtype auto, as the fixture resolves it

    kill_at = random.randint(8, 36)  # anywhere, a checkpoint write included: one happens every 5 steps
    run = tmp_path / "killed"
    process = subprocess.Popen(slm(*train_args(tiny_data, run, *args)), stderr=subprocess.DEVNULL)
    wait_for_step(run, kill_at, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    subprocess.run(slm(*train_args(tiny_data, run, *args, "--resume")), check=True, capture_output=True)

    assert_same_weights(reference, run)
    assert step_losses(run) == step_losses(reference), f"killed at step {kill_at}"
    steps = [r["step"] for r in records(run) if "loss" in r]
    assert steps == list(range(1, 41)), "each step recorded once"
    resumed = [r for r in records(run) if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] <= kill_at


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_says_how_to_resume(tmp_path, tiny_data):
    run = tmp_path / "run"
    process = subprocess.Popen(slm(*train_args(tiny_data, run, "--max-steps", "5000", "--eval-interval", "1000")),
                               stderr=subprocess.PIPE, text=True)
    wait_for_step(run, 3, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert "Resume with: slm train" in err and "--resume" in err and "Traceback" not in err
    saved_step = json.loads((run / "last" / "manifest.json").read_text())["step"]
    assert saved_step == max(step_losses(run)) >= 3
    checkpoint.verify(run / "last")
    assert status(run, records(run)) == "interrupted" and not (run / PID_FILE).exists()


def test_a_corrupt_last_checkpoint_falls_back_to_the_newest_valid_one(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    cfg = tiny_config(tiny_data, max_steps=10, eval_interval=5, keep_checkpoints=2)
    start(cfg, run)
    weights = run / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    state = resume(run, flags={"train": {"max_steps": 12}})
    assert "skipping" in capsys.readouterr().err
    assert state.step == 12
    assert [r["step"] for r in records(run) if r.get("event") == "resumed"] == [5]


def test_a_crash_between_the_two_renames_of_a_checkpoint_swap_still_resumes(tmp_path, tiny_data):
    run = tmp_path / "run"
    start(tiny_config(tiny_data, max_steps=10, eval_interval=5, keep_checkpoints=2), run)
    os.rename(run / "last", run / "history" / "step-00000010")  # last moved away, its successor never arrived
    assert checkpoint.resumable(run) == run / "history" / "step-00000010"
    assert resume(run).step == 10


def test_only_the_newest_checkpoints_are_kept(tmp_path, tiny_data):
    run = tmp_path / "run"
    start(tiny_config(tiny_data, max_steps=20, eval_interval=5, keep_checkpoints=3), run)
    assert sorted(p.name for p in (run / "history").iterdir()) == ["step-00000010", "step-00000015"]
    assert json.loads((run / "last" / "manifest.json").read_text())["step"] == 20
    assert (run / "best" / "model.safetensors").is_file()


class InjectInf:
    """Makes the token embedding output inf on chosen steps: a stand-in for a bad batch or a blow-up."""

    def __init__(self, batches, bad_steps):
        self.batches, self.bad_steps, self.active = batches, bad_steps, False

    def __call__(self, step):
        self.active = step in self.bad_steps
        return self.batches(step)

    def hook(self, module, inputs, output):
        return output + float("inf") if self.active else output


def train_with_infs(cfg, run, bad_steps):
    from slm.model.gpt import GPT
    from slm.training.loop import train

    torch.manual_seed(0)
    model = GPT(cfg.model)
    inject = InjectInf(PretrainBatches(cfg.train.data, cfg, torch.device("cpu")), bad_steps)
    model.transformer.wte.register_forward_hook(inject.hook)
    checkpoint.prepare_run_dir(run, force=False)
    (run / "config.toml").write_text(cfg.to_toml())
    return train(cfg, run, batches=inject, init_model=model)


def test_a_non_finite_loss_skips_the_step_counts_it_and_training_goes_on(tmp_path, tiny_data):
    cfg = tiny_config(tiny_data, max_steps=12, eval_interval=6)
    state = train_with_infs(cfg, tmp_path / "run", bad_steps={3, 4})
    skipped = [r["step"] for r in records(tmp_path / "run") if r.get("skipped")]
    assert skipped == [4, 5] and state.skipped_steps == 2 and state.bad_steps_in_row == 0
    weights = load_file(tmp_path / "run" / "last" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_too_many_non_finite_steps_in_a_row_stop_the_run_keeping_the_last_good_checkpoint(tmp_path, tiny_data):
    cfg = tiny_config(tiny_data, max_steps=30, eval_interval=5, max_bad_steps=3)
    with pytest.raises(SlmError, match="3 steps in a row .* non-finite"):
        train_with_infs(cfg, tmp_path / "run", bad_steps=set(range(7, 100)))
    assert json.loads((tmp_path / "run" / "last" / "manifest.json").read_text())["step"] == 5
    checkpoint.verify(tmp_path / "run" / "last")


def test_resume_refuses_a_conflicting_architecture_but_accepts_a_longer_budget(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_data, run, "--max-steps", "6")) == 0
    capsys.readouterr()
    assert main(train_args(tiny_data, run, "--max-steps", "6", "--n-layer", "3", "--resume")) == 2
    err = capsys.readouterr().err
    assert "--n-layer 3 (the run has 2)" in err and err.count("\n") == 1
    assert main(train_args(tiny_data, run, "--max-steps", "8", "--resume")) == 0
    assert max(step_losses(run)) == 8


def test_a_run_stopped_before_its_first_checkpoint_resumes_by_starting_again_to_the_same_end(tmp_path, tiny_data,
                                                                                            capsys):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert main(train_args(tiny_data, whole, "--max-steps", "6")) == 0
    assert main(train_args(tiny_data, stopped, "--max-steps", "6")) == 0
    for folder in ("last", "best", "history"):  # as a kill before the first checkpoint leaves it: config.toml, metrics
        if (stopped / folder).exists():
            shutil.rmtree(stopped / folder)
    capsys.readouterr()
    assert main(["train", "--out", str(stopped), "--resume"]) == 0  # the recorded config, flags not repeated
    assert "stopped before its first checkpoint; starting it again" in capsys.readouterr().err
    assert_same_weights(whole, stopped)
    assert step_losses(stopped) == step_losses(whole)


def test_resume_without_a_run_and_resume_with_force_are_errors(tmp_path, tiny_data, capsys):
    assert main(train_args(tiny_data, tmp_path / "none", "--resume")) == 2
    assert "no run to resume" in capsys.readouterr().err
    assert main(train_args(tiny_data, tmp_path / "none", "--resume", "--force")) == 2
    assert "pass only one" in capsys.readouterr().err


def test_data_from_another_tokenizer_is_refused(tmp_path, tiny_run, capsys):
    import numpy as np

    other = write_prepared(tmp_path / "other", np.arange(500), np.arange(500))
    meta = json.loads((other / "meta.json").read_text())
    meta["tokenizer"]["vocab_hash"] = "0123456789abcdef"
    (other / "meta.json").write_text(json.dumps(meta))
    assert main(["eval", str(tiny_run), "--data", str(other)]) == 2
    assert "prepared with tokenizer" in capsys.readouterr().err
    assert main(train_args(other, tmp_path / "run")) == 2
    assert "prepared with tokenizer" in capsys.readouterr().err


def test_a_full_disk_while_saving_is_a_clear_error_and_the_old_checkpoint_stays(tmp_path, tiny_run, monkeypatch):
    from slm.runs.checkpoint import load_model

    run = tmp_path / "copy"
    model, cfg, tok = load_model(tiny_run / "last")
    checkpoint.save(run, "last", model, cfg, tok, {"state": {}}, step=1)
    before = (run / "last" / "model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(SlmError, match="disk filled .* previous checkpoint is intact"):
        checkpoint.save(run, "last", model, cfg, tok, {"state": {}}, step=2)
    assert (run / "last" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["last"]
