import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import write_conversations
from slm.assistant.finetune import finetune, finetune_config
from slm.cli import main, parse_args
from slm.config import flags_from_args, resolve
from slm.data.template import read_conversations, render
from slm.errors import SlmError
from slm.runs.checkpoint import checkpoint_dir, load_model, read_header
from slm.runs.files import read_metrics

FAST = {"max_steps": 16, "eval_interval": 8, "eval_batches": 2, "learning_rate": 3e-3, "warmup_steps": 2,
        "device": "cpu", "sample_tokens": 0}


def assistant_loss(model, conversations):
    """Mean cross-entropy of the assistant's tokens, computed here from render's mask alone."""
    total, count = 0.0, 0
    with torch.no_grad():
        for messages in conversations:
            ids, mask = render(messages)
            logits, _ = model(torch.tensor([ids[:-1]]))
            learned = torch.tensor(mask[1:])
            total += F.cross_entropy(logits[0][learned], torch.tensor(ids[1:])[learned], reduction="sum").item()
            count += int(learned.sum())
    return total / count


@pytest.fixture(scope="module")
def assistant_run(tiny_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune")
    data = write_conversations(folder / "chat.jsonl", 64, seed=0)
    val = write_conversations(folder / "val.jsonl", 8, seed=1)
    finetune(tiny_run, data, folder / "run", val_data=val, flags=FAST)
    return folder / "run", val


def test_finetuning_lowers_the_loss_on_the_assistant_tokens(tiny_run, assistant_run):
    run, val = assistant_run
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 8, 16]  # step 0: the base model on the same batches
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    conversations = read_conversations(val)
    before = assistant_loss(load_model(checkpoint_dir(tiny_run))[0], conversations)
    after = assistant_loss(load_model(checkpoint_dir(run))[0], conversations)
    assert after < before - 1.0


def test_a_finetuned_run_keeps_the_base_model_config_and_records_its_recipe(tiny_run, assistant_run):
    run, val = assistant_run
    base, _ = read_header(checkpoint_dir(tiny_run))
    tuned, _ = read_header(checkpoint_dir(run))
    assert tuned.model == base.model
    assert tuned.train.max_steps == FAST["max_steps"] and tuned.train.data == ""
    recipe = json.loads((run / "finetune.json").read_text())
    assert recipe["val_data"] == str(val) and recipe["conversations"] == {"train": 64, "validation": 8}


def test_finetune_settings_come_from_the_base_run_with_finetune_defaults_and_flags():
    base = resolve("cpu")
    cfg = finetune_config(base, {})
    assert cfg.model == base.model and cfg.train.batch_size == base.train.batch_size
    assert (cfg.train.max_minutes, cfg.train.max_steps, cfg.train.learning_rate) == (0.0, 300, 3e-4)
    assert (base.train.weight_decay, cfg.train.weight_decay) == (0.5, 0.1)
    assert (base.train.decay, cfg.train.decay) == ("linear", "cosine")
    assert cfg.train.min_learning_rate == pytest.approx(3e-5)
    assert finetune_config(base, {"learning_rate": 1e-2}).train.min_learning_rate == pytest.approx(1e-3)
    assert finetune_config(base, {"learning_rate": 1e-2, "min_learning_rate": 0.0}).train.min_learning_rate == 0.0


def test_a_finetune_keeps_the_base_runs_optimizer_and_lowers_muons_peak_as_adamws():
    base = resolve("cpu", flags={"train": {"optimizer": "muon", "muon_learning_rate": 5e-3}})
    cfg = finetune_config(base, {})
    assert (cfg.train.optimizer, cfg.train.learning_rate, cfg.train.muon_learning_rate) == ("muon", 3e-4, 3e-4)
    assert finetune_config(base, {"optimizer": "adamw"}).train.optimizer == "adamw"
    adamw_base = resolve("cpu", flags={"train": {"optimizer": "adamw"}})
    assert finetune_config(adamw_base, {}).train.optimizer == "adamw"


def test_the_finetune_command_takes_train_flags_but_its_own_data_flag():
    args = parse_args(["finetune", "R", "--data", "chat.jsonl", "--out", "O", "--max-steps", "5",
                       "--learning-rate", "1e-4"])
    assert args.data == "chat.jsonl"
    assert flags_from_args(args) == {"train": {"max_steps": 5, "learning_rate": 1e-4}}


def test_a_stopped_finetune_resumes_with_its_metrics_intact(tiny_run, tmp_path):
    data = write_conversations(tmp_path / "chat.jsonl", 40, seed=2)
    flags = {**FAST, "max_steps": 4, "eval_interval": 2}
    finetune(tiny_run, data, tmp_path / "run", flags=flags)
    state = finetune(tiny_run, data, tmp_path / "run", flags={"max_steps": 6}, resume=True)
    assert state.step == 6
    evals = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    assert evals == [0, 2, 4, 6]


def test_resume_starts_again_a_finetune_killed_before_its_first_checkpoint(tiny_run, tmp_path, monkeypatch):
    data = write_conversations(tmp_path / "chat.jsonl", 40, seed=2)
    flags = {**FAST, "max_steps": 4, "eval_interval": 2}
    finetune(tiny_run, data, tmp_path / "never-stopped", flags=flags)

    def killed(*_, **__):
        raise KeyboardInterrupt  # stands for SIGKILL: the run folder holds its config, recipe and step 0, no checkpoint
    with monkeypatch.context() as patch:
        patch.setattr("slm.assistant.finetune.train", killed)
        with pytest.raises(KeyboardInterrupt):
            finetune(tiny_run, data, tmp_path / "run", flags=flags)
    assert (tmp_path / "run" / "config.toml").is_file() and not (tmp_path / "run" / "last").exists()
    assert finetune(tiny_run, data, tmp_path / "run", flags=flags, resume=True).step == 4
    weights = [load_file(tmp_path / run / "last" / "model.safetensors") for run in ("never-stopped", "run")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r] == [0, 2, 4]


def test_tensorboard_holds_the_base_models_validation_loss_at_step_0(tiny_run, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    data = write_conversations(tmp_path / "chat.jsonl", 40, seed=3)
    finetune(tiny_run, data, tmp_path / "run", flags={**FAST, "max_steps": 2, "eval_interval": 2, "tensorboard": True})
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    logged = [(r["step"], r["val_loss"]) for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
              if "val_loss" in r]
    assert [s.step for s in events.Scalars("val/loss")] == [step for step, _ in logged] == [0, 2]
    assert [s.value for s in events.Scalars("val/loss")] == pytest.approx([loss for _, loss in logged], rel=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--data", "missing.jsonl"], "does not exist"),
    (["--data", "chat.txt"], "chat data is a .jsonl file"),
    (["--data", "chat.jsonl", "--val-fraction", "1.5"], "--val-fraction must be above 0"),
    (["--data", "chat.jsonl", "--val-fraction", "0.001"], "left 40 for training and 0 for validation"),
    (["--data", "chat.jsonl", "--resume", "--force"], "pass only one"),
])
def test_bad_finetune_input_is_one_line_on_stderr_and_exit_2(tiny_run, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    write_conversations(tmp_path / "chat.jsonl", 40, seed=3)
    (tmp_path / "chat.txt").write_text("hello")
    assert main(["finetune", str(tiny_run), "--out", "out", "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slm: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_finetuning_into_the_base_run_is_refused(tiny_run, tmp_path):
    with pytest.raises(SlmError, match="is the base run"):
        finetune(tiny_run, write_conversations(tmp_path / "c.jsonl", 4, 0), tiny_run)


def test_force_replaces_a_run_only_once_the_data_is_known_good(tiny_run, tmp_path, capsys):
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.toml").write_text("# a previous run")
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "no answer"}]}\n')
    assert main(["finetune", str(tiny_run), "--data", str(tmp_path / "bad.jsonl"), "--out", str(old), "--force"]) == 2
    assert "no assistant message" in capsys.readouterr().err
    assert (old / "config.toml").read_text() == "# a previous run"
