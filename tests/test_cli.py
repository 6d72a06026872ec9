import subprocess
import sys

import pytest

from slm.cli import COMMANDS, main, parse_args
from slm.errors import SlmError
from slm.inference.sampling import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE


def test_slm_help_lists_every_command_without_importing_torch():
    code = ("import sys\nfrom slm.cli import COMMANDS, main\ntry:\n    main(['--help'])\nexcept SystemExit as exit:\n"
            "    assert exit.code == 0, exit.code\nassert 'torch' not in sys.modules, 'torch imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert all(name in out for name in COMMANDS)


def test_python_dash_m_slm_works():
    out = subprocess.run([sys.executable, "-m", "slm", "--help"], capture_output=True, text=True, check=True)
    assert "prepare" in out.stdout and "train" in out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_shows_its_arguments_and_examples_in_its_help(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: slm {command} [-h] ") and "examples:" in out


def test_only_the_chosen_command_declares_its_arguments():
    args = parse_args(["generate", "runs/demo", "--prompt", "train"])
    assert (args.command, args.run, args.prompt) == ("generate", "runs/demo", "train")
    with pytest.raises(SlmError, match="invalid choice: 'trian'"):
        parse_args(["trian", "--out", "R"])


# chat: RUN/sampling.json, else DEFAULT_TEMPERATURE; eval-assistant: greedy on purpose, for reproducible scores
@pytest.mark.parametrize("command, temperature", [("generate", DEFAULT_TEMPERATURE), ("chat", None),
                                                  ("eval-assistant", 0.0)])
def test_sampling_defaults_come_from_one_place(command, temperature):
    args = parse_args([command, "R", "--prompts", "P"] if command == "eval-assistant" else [command, "R"])
    assert (args.temperature, args.max_new_tokens) == (temperature, DEFAULT_MAX_NEW_TOKENS)


def test_subcommand_usage_errors_are_one_line(capsys):
    assert main(["eval", "R", "--data", "D", "--batch-size", "3"]) == 2  # eval has --micro-batch-size instead
    err = capsys.readouterr().err
    assert err.startswith("slm: error: unrecognized arguments: --batch-size 3") and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["train", "--out", "R"], "no training data"),
    (["train", "--out", "R", "--data", "nowhere"], "not a prepared data folder"),
    (["train", "--out", "R", "--data", "d", "--n-embd", "30", "--n-head", "4"], "divisible by --n-head"),
    (["train", "--out", "R", "--data", "d", "--batch-size", "-1"], "--batch-size must be positive"),
    (["train", "--out", "R", "--data", "d", "--optimizer", "sgd"], "--optimizer must be one of adamw, muon"),
    (["train", "--out", "R", "--data", "d", "--muon-learning-rate", "-0.02"], "--muon-learning-rate must be positive"),
    (["train", "--out", "R", "--config", "missing.toml"], "does not exist"),
])
def test_bad_training_input_is_one_line_on_stderr_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("slm: error: ") and message in captured.err
    assert captured.err.count("\n") == 1
    assert not (tmp_path / "R").exists()


def test_an_existing_run_is_not_overwritten(tiny_run, tiny_data, capsys):
    before = (tiny_run / "last" / "model.safetensors").read_bytes()
    assert main(["train", "--data", str(tiny_data), "--out", str(tiny_run), "--preset", "tiny"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tiny_run / "last" / "model.safetensors").read_bytes() == before


def test_the_public_api_imports_lazily():
    code = ("import sys, slm; assert 'torch' not in sys.modules; "
            "from slm import GPT, ModelConfig, load_model, generate, get_tokenizer; assert 'torch' in sys.modules; "
            "assert callable(generate) and generate.__name__ == 'generate'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_training_pages_config_table_is_current():
    from pathlib import Path

    from slm.config import config_table

    page = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text(encoding="utf-8")
    assert config_table() in page, "regenerate docs/training.md's table with slm.config.config_table()"
