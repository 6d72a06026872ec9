"""The pipelines chain the stages; here the assistant one, on the tiny base run."""

import json

import pytest

from slm import run
from slm.cli import main


@pytest.mark.slow
def test_run_assistant_fine_tunes_a_base_run_and_prints_both_scores(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run, "ASSISTANT_STEPS", 6)
    monkeypatch.setattr(run, "ASSISTANT_PROMPTS", 4)
    assert main(["run", "assistant", "--base", str(tiny_run), "--out", "assistant"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- instruction ---") == 3 and "assistant scores on 4 held-out prompts" in out
    assert str(tiny_run) in out and "assistant" in out.splitlines()[-1]
    records = [json.loads(line) for line in (tmp_path / "assistant" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and max(r["step"] for r in records) == 6
    assert (tmp_path / "data" / "assistant" / "prompts.jsonl").is_file()
