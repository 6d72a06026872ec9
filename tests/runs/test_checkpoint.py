import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from slm.cli import main
from slm.config import Config, ModelConfig
from slm.data.tokenizer import get_tokenizer
from slm.errors import SlmError
from slm.model.gpt import GPT
from slm.runs import checkpoint
from slm.runs.files import MetricsLog, atomic_path, read_metrics

CFG = Config(model=ModelConfig(vocab_size=101, block_size=16, n_layer=2, n_head=2, n_embd=32))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(CFG.model).eval()


def test_save_then_load_gives_identical_logits_and_a_tied_head(tmp_path, model):
    checkpoint.save(tmp_path, "best", model, CFG, get_tokenizer().identity())
    loaded, cfg, tokenizer = checkpoint.load_model(tmp_path / "best")
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(ids)[0], model(ids)[0])
    assert cfg == CFG and tokenizer == get_tokenizer().identity()
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert "lm_head.weight" not in load_file(tmp_path / "best" / "model.safetensors")  # stored once


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, model, monkeypatch):
    checkpoint.save(tmp_path, "last", model, CFG, {})
    before = (tmp_path / "last" / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, "last", model, CFG, {})
    assert (tmp_path / "last" / "model.safetensors").read_bytes() == before


# A child replaces the folder OUT holding "old" by one holding "new", and SIGKILLs itself at one of two moments.
KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from slm.runs import files
    out, moment = Path(sys.argv[1]), sys.argv[2]
    rename = os.replace
    def replace(src, dst):
        rename(src, dst)
        if moment == "swapping" and Path(dst).name.startswith("."):  # the old folder has just moved aside
            os.kill(os.getpid(), signal.SIGKILL)
    files.os.replace = replace
    with files.atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
        if moment == "building":
            os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("moment, left", [("building", ["tmp"]), ("swapping", ["old", "tmp"])])
def test_the_next_write_clears_what_a_killed_writer_left_and_puts_back_a_folder_it_moved_aside(tmp_path, moment,
                                                                                                left):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out), moment])
    assert child.wait() == -9
    assert sorted(p.name for p in tmp_path.iterdir() if p != out) == [f".out.{kind}-{child.pid}" for kind in left]
    with atomic_path(out) as tmp:  # it first clears the dead writer's leftovers: the old folder is back, whole
        assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old").read_text() == "old"
        tmp.mkdir()
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not any(out.iterdir())


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path, model):
    path = checkpoint.save(tmp_path, "best", model, CFG, {}) / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(SlmError, match="corrupt or truncated"):
        checkpoint.load_model(tmp_path / "best")


def test_one_altered_byte_of_the_weights_is_refused_by_load_model_and_slm_generate(tmp_path, capsys):
    cfg = Config(model=ModelConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=32))
    run = tmp_path / "run"
    checkpoint.prepare_run_dir(run, force=False)
    (run / "config.toml").write_text(cfg.to_toml())
    weights = checkpoint.save(run, "best", GPT(cfg.model), cfg, get_tokenizer().identity()) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight: the file still parses, only its hash tells
    weights.write_bytes(bytes(data))
    with pytest.raises(SlmError, match="truncated or corrupt") as err:
        checkpoint.load_model(run / "best")
    assert str(weights) in str(err.value) and "other checkpoint" in str(err.value)
    assert main(["generate", str(run), "--prompt", "Once", "--max-new-tokens", "2", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"slm: error: {err.value}\n"


def test_a_checkpoint_from_a_newer_format_is_refused(tmp_path, model):
    folder = tmp_path / "best"
    folder.mkdir()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, folder / "model.safetensors", metadata={"format_version": "99", "config": CFG.to_json()})
    with pytest.raises(SlmError, match="newer slm"):
        checkpoint.load_model(folder)


def test_trainer_state_loads_with_weights_only(tmp_path, model):
    checkpoint.save(tmp_path, "last", model, CFG, {}, {"state": {"step": 3, "rng": torch.get_rng_state()}})
    assert checkpoint.load_trainer_state(tmp_path / "last")["state"]["step"] == 3
    (tmp_path / "last" / "trainer.pt").write_bytes(b"garbage")
    with pytest.raises(SlmError, match="corrupt"):
        checkpoint.load_trainer_state(tmp_path / "last")


def test_an_existing_run_is_never_overwritten_without_force(tmp_path):
    run = tmp_path / "run"
    checkpoint.prepare_run_dir(run, force=False)
    (run / "config.toml").write_text("")
    with pytest.raises(SlmError, match="--force"):
        checkpoint.prepare_run_dir(run, force=False)
    checkpoint.prepare_run_dir(run, force=True)
    assert not any(run.iterdir())
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    with pytest.raises(SlmError, match="not an slm run folder"):
        checkpoint.prepare_run_dir(other, force=True)
    assert (other / "cat.jpg").exists()


def test_best_falls_back_to_last_when_no_evaluation_improved_yet(tmp_path, model):
    checkpoint.save(tmp_path, "last", model, CFG, {})
    assert checkpoint.checkpoint_dir(tmp_path, "best") == tmp_path / "last"
    with pytest.raises(SlmError, match="no last checkpoint"):
        checkpoint.checkpoint_dir(tmp_path / "x" if (tmp_path / "x").mkdir() is None else tmp_path, "last")


def test_metrics_log_appends_json_lines(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "loss": 2.0})
    log.write({"step": 2, "loss": 1.5})
    log.close()
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_compact_head_round_trips_with_its_frequency_tables(tmp_path):
    cfg = Config(model=ModelConfig(vocab_size=101, block_size=16, n_layer=1, n_head=2, n_embd=32, vocab_head=8))
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    model.lm_head.set_frequencies(torch.arange(101).flip(0))
    checkpoint.save(tmp_path, "best", model, cfg, {})
    loaded, _, _ = checkpoint.load_model(tmp_path / "best")
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(ids)[0], model(ids)[0])
    assert torch.equal(loaded.lm_head.head_ids, torch.arange(8))


def test_strict_metrics_reading_rejects_a_bad_line_but_skips_a_last_line_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_metrics(path, strict=True) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    assert read_metrics(path) == [{"step": 1}, {"step": 3}]
    with pytest.raises(SlmError, match="line 2, is not a JSON object"):
        read_metrics(path, strict=True)


def test_the_manifest_counts_the_parameters(tmp_path, model):
    checkpoint.save(tmp_path, "best", model, CFG, {})
    assert json.loads((tmp_path / "best" / "manifest.json").read_text())["parameters"] == model.num_parameters()
