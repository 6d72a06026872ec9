import io
import json
import shutil

import pytest
import torch

from conftest import CONVERSATIONS
from slm.assistant.chat import ChatSession, answer_lines, chat_loop
from slm.cli import main
from slm.config import ModelConfig
from slm.data.tokenizer import EOT_ID
from slm.inference.sampling import SamplingSettings
from slm.model.gpt import GPT
from slm.runs.checkpoint import checkpoint_dir, load_model


def eot_model():
    """A tiny GPT whose every next token is end-of-text: its final norm outputs wte[EOT]'s direction."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        direction = torch.nn.functional.normalize(torch.randn(16), dim=0)
        model.transformer.wte.weight[EOT_ID] = 10 * direction
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)
    return model


def test_an_answer_ends_at_end_of_text_which_is_not_part_of_it():
    session = ChatSession(eot_model(), None, SamplingSettings(temperature=0.0, max_new_tokens=5))
    assert "".join(session.say("Hi!")) == ""
    assert session.messages == [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": ""}]


@pytest.fixture(scope="module")
def tiny_model(tiny_run):
    return load_model(checkpoint_dir(tiny_run))[0]


def test_the_chat_loop_answers_and_obeys_its_commands(tiny_model):
    session = ChatSession(tiny_model, "Be kind.", SamplingSettings(temperature=0.0, max_new_tokens=6))
    out = io.StringIO()
    chat_loop(session, ["Hello there", "/temperature 0.5", "/temperature hot", "/temperature -1", "/reset",
                        "Tom had", "/nope", "/exit", "never read"], out)
    assert session.settings.temperature == 0.5
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]  # /reset kept the system message
    assert session.messages[1]["content"] == "Tom had"
    text = out.getvalue()
    assert "(temperature 0.5)" in text and text.count("/temperature needs a number") == 2
    assert "unknown command /nope" in text and "never read" not in text


def test_a_greedy_answer_is_the_same_in_the_chat_loop_and_on_stdin(tiny_model):
    session = ChatSession(tiny_model, None, SamplingSettings(temperature=0.0, max_new_tokens=8))
    out = io.StringIO()
    chat_loop(session, ["Tom had"], out)
    scripted = io.StringIO()
    answer_lines(session, ["Tom had\n"], scripted)
    assert scripted.getvalue() == " ".join(out.getvalue().strip().split("\n")) + "\n"


def test_slm_chat_reads_stdin_and_prints_one_answer_line_per_input_line(tiny_run, monkeypatch, capsys):
    lines = ["Tom had a", "", json.dumps(CONVERSATIONS[0] + [{"role": "user", "content": "And Lily?"}]), "Mia"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", str(tiny_run), "--temperature", "0", "--max-new-tokens", "12", "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3  # the blank line is no conversation


def test_a_bad_json_line_on_stdin_is_a_one_line_error(tiny_run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO('[{"role": "robot", "content": "hi"}]\n'))
    assert main(["chat", str(tiny_run), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("slm: error: stdin line 1: message 1 has role 'robot'")


def test_slm_chat_samples_as_the_runs_sampling_json_says_unless_a_flag_says_otherwise(tiny_run, tmp_path,
                                                                                    monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "sampling.json").write_text('{"temperature": 0}')

    def answers(*flags):
        monkeypatch.setattr("sys.stdin", io.StringIO("Tom had a\n"))
        assert main(["chat", str(run), "--max-new-tokens", "12", "--device", "cpu", *flags]) == 0
        return capsys.readouterr().out

    greedy = {answers("--seed", str(seed)) for seed in range(3)}
    assert greedy == {answers("--temperature", "0")}  # the run's temperature 0: the same answer whatever the seed
    assert len({answers("--seed", str(seed), "--temperature", "2") for seed in range(4)}) > 1
