import subprocess
import sys

import pytest

from slm.cli import build_parser, main


def test_help_does_not_import_torch():
    code = ("import sys; from slm.cli import build_parser; build_parser().format_help(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_python_dash_m_slm_works():
    out = subprocess.run([sys.executable, "-m", "slm", "--help"], capture_output=True, text=True, check=True)
    assert "prepare" in out.stdout and "train" in out.stdout


@pytest.mark.parametrize("command", ["prepare", "train", "generate", "eval", "run", "bench", "make-instructions",
                                     "finetune", "chat", "eval-assistant", "serve", "export", "import",
                                     "plot", "runs"])
def test_every_command_shows_examples_in_its_help(command, capsys):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args([command, "--help"])
    assert exit.value.code == 0
    assert "examples:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "--out", "R"], "no training data"),
    (["train", "--out", "R", "--data", "nowhere"], "not a prepared data folder"),
    (["train", "--out", "R", "--data", "d", "--n-embd", "30", "--n-head", "4"], "divisible by --n-head"),
    (["train", "--out", "R", "--data", "d", "--batch-size", "-1"], "--batch-size must be positive"),
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
            "from slm import GPT, ModelConfig, load_model, generate, get_tokenizer; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_readme_config_table_is_current():
    from pathlib import Path

    from slm.config import config_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert config_table() in readme, "regenerate the README table with slm.config.config_table()"
