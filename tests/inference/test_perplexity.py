import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import write_prepared
from slm.cli import main
from slm.config import ModelConfig
from slm.data.tokenizer import get_tokenizer
from slm.inference.perplexity import bits_per_byte, evaluate_tokens, windows
from slm.model.gpt import GPT

CPU = torch.device("cpu")
BLOCK = 16


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(block_size=BLOCK, n_layer=2, n_head=2, n_embd=32)).eval()


def random_tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50257, n).astype(np.uint16)


def summed_cross_entropy(model: GPT, window: np.ndarray) -> float:
    """The obvious computation: one forward over the window, cross-entropy of every next token."""
    ids = torch.from_numpy(window.astype(np.int64))
    logits, _ = model(ids[None, :-1])
    return F.cross_entropy(logits[0], ids[1:], reduction="sum").item()


def test_bits_per_byte_at_known_values():
    assert bits_per_byte(math.log(2), 1) == pytest.approx(1.0)
    assert bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)
    assert bits_per_byte(0.0, 10) == 0.0


def test_a_stream_within_one_block_equals_one_forward_pass(model):
    tokens = random_tokens(BLOCK)
    nats, count = evaluate_tokens(model, tokens, batch_size=4, device=CPU, dtype=torch.float32)
    assert count == BLOCK - 1
    assert nats == pytest.approx(summed_cross_entropy(model, tokens), rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3, 100])
def test_a_long_stream_equals_the_sum_over_windows_overlapping_by_one_token(model, batch_size):
    tokens = random_tokens(5 * BLOCK + 7)
    expected = sum(summed_cross_entropy(model, tokens[s:s + BLOCK + 1]) for s in range(0, len(tokens) - 1, BLOCK))
    nats, count = evaluate_tokens(model, tokens, batch_size, CPU, torch.float32)
    assert count == len(tokens) - 1
    assert nats == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("n_tokens", [2, 3, BLOCK, BLOCK + 1, BLOCK + 2, 3 * BLOCK + 1, 3 * BLOCK + 5])
def test_every_token_after_the_first_is_predicted_exactly_once(n_tokens):
    predicted = []
    for starts, length in windows(n_tokens, BLOCK, batch_size=2):
        assert 1 <= length <= BLOCK
        for start in starts:
            predicted += range(start + 1, start + length + 1)
    assert predicted == list(range(1, n_tokens))


def eval_json(capsys, *args: str) -> dict:
    assert main(["eval", *map(str, args), "--json", "--micro-batch-size", "3"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_json_reports_consistent_figures_over_the_whole_validation_split(tiny_run, tiny_data, capsys):
    result = eval_json(capsys, tiny_run, "--data", tiny_data)
    meta = json.loads((tiny_data / "meta.json").read_text())["splits"]["validation"]
    assert set(result) == {"loss", "perplexity", "bits_per_byte", "tokens", "bytes"}
    assert result["tokens"] == meta["tokens"] - 1
    assert result["bytes"] == meta["bytes"]
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / math.log(2) / result["bytes"])
    assert 0 < result["loss"] < math.log(50257)  # trained: better than a uniform guess


def test_last_checkpoint_and_table_output(tiny_run, tiny_data, capsys):
    assert main(["eval", str(tiny_run), "--data", str(tiny_data), "--checkpoint", "last"]) == 0
    out = capsys.readouterr().out
    assert str(tiny_run / "last") in out and "bits per byte" in out


def test_a_raw_file_scores_exactly_like_the_folder_slm_prepare_makes_of_it(tiny_run, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    stories = ["Tom had a ball. Tom liked the ball. The end.", "  Lily had a cake.\n\nThe end. ", "Mia — café ☕"]
    (corpus / "train.txt").write_text("Sam had a tree. The end.\n<|endoftext|>\nMia had a cat.\n")
    (corpus / "valid.txt").write_text("\n<|endoftext|>\n".join(stories) + "\n", encoding="utf-8")
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "data"), "--workers", "1"]) == 0

    raw = eval_json(capsys, tiny_run, "--data", corpus / "valid.txt")
    prepared = eval_json(capsys, tiny_run, "--data", tmp_path / "data")
    assert raw == prepared
    tok = get_tokenizer()
    assert raw["tokens"] == sum(len(tok.encode(s.strip())) + 1 for s in stories) - 1  # EOT after each story
    assert raw["bytes"] == sum(len(s.strip().encode("utf-8")) for s in stories)


def test_a_jsonl_file_reads_the_chosen_text_field(tiny_run, tmp_path, capsys):
    path = tmp_path / "valid.jsonl"
    path.write_text(json.dumps({"body": "Tom had a ball. The end."}) + "\n")
    result = eval_json(capsys, tiny_run, "--data", path, "--text-field", "body")
    assert result["tokens"] == len(get_tokenizer().encode("Tom had a ball. The end."))


def expect_error(capsys, *args: str) -> str:
    assert main(["eval", *map(str, args)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("slm: error: ") and captured.err.count("\n") == 1
    return captured.err


def test_a_missing_data_file_is_a_one_line_error(tiny_run, tmp_path, capsys):
    assert "does not exist" in expect_error(capsys, tiny_run, "--data", tmp_path / "nope.txt")


def test_an_empty_file_is_a_one_line_error(tiny_run, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert "0 tokens" in expect_error(capsys, tiny_run, "--data", tmp_path / "empty.txt")


def test_a_split_of_one_token_is_a_one_line_error(tiny_run, tmp_path, capsys):
    folder = write_prepared(tmp_path / "data", random_tokens(100), np.array([50256]))
    assert "at least 2" in expect_error(capsys, tiny_run, "--data", folder)


def test_data_from_another_tokenizer_is_a_one_line_error(tiny_run, tmp_path, capsys):
    folder = write_prepared(tmp_path / "data", random_tokens(100), random_tokens(100))
    meta = json.loads((folder / "meta.json").read_text())
    meta["tokenizer"]["vocab_hash"] = "0123456789abcdef"
    (folder / "meta.json").write_text(json.dumps(meta))
    assert "tokenizer" in expect_error(capsys, tiny_run, "--data", folder)


def test_a_missing_run_and_a_bad_micro_batch_size_are_one_line_errors(tiny_run, tiny_data, tmp_path, capsys):
    assert "does not exist" in expect_error(capsys, tmp_path / "no-run", "--data", tiny_data)
    assert "--micro-batch-size" in expect_error(capsys, tiny_run, "--data", tiny_data, "--micro-batch-size", "0")
