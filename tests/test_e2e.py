"""The whole pipeline on real TinyStories text, through the command line a user types."""

import json

import pytest

from slm.cli import main


@pytest.mark.slow
def test_prepare_train_generate_eval_on_the_real_tinystories_sample(shared_sample, tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["prepare", str(shared_sample), "--out", str(data)]) == 0
    meta = json.loads((data / "meta.json").read_text())
    assert meta["splits"]["train"]["tokens"] > 1_000_000 and meta["splits"]["validation"]["documents"] > 100

    assert main(["train", "--data", str(data), "--out", str(run), "--preset", "tiny", "--max-steps", "50",
                 "--eval-interval", "25", "--batch-size", "8", "--micro-batch-size", "8", "--device", "cpu"]) == 0
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first_loss = next(r["loss"] for r in evals if "loss" in r)
    val = [r["val_loss"] for r in evals if "val_loss" in r]
    assert val[-1] < first_loss - 3.0, (first_loss, val)  # from ~10.8 (uniform over 50,257 ids)

    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "Once upon a time", "--max-new-tokens", "30", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("Once upon a time")

    assert main(["eval", str(run), "--data", str(shared_sample / "valid.txt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == meta["splits"]["validation"]["tokens"] - 1
    assert report["loss"] == pytest.approx(val[-1], abs=0.5)  # the whole file agrees with the sampled windows
