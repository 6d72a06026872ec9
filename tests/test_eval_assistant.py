import json
import shutil

import pytest

from slm.cli import main
from slm.errors import SlmError
from slm.eval_assistant import name_score, read_prompts, words_score
from slm.instructions import make_instructions


def test_the_words_score_is_the_share_of_requested_words_used_whole():
    assert words_score("The Ball hit the tree.", ["ball", "tree", "happy"]) == pytest.approx(2 / 3)
    assert words_score("balloons and trees", ["ball", "tree"]) == 0.0


def test_the_name_score_wants_exactly_the_name():
    assert name_score(" Lily.\n", "Lily") == 1.0 and name_score("lily", "Lily") == 1.0
    assert name_score("Lily and Tom", "Lily") == 0.0 and name_score("Once upon a time, Lily", "Lily") == 0.0


def test_the_reference_answer_is_not_part_of_the_prompt(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"kind": "name", "name": "Tom", "messages": [
        {"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Tom"}]}) + "\n")
    [(row, conversation)] = read_prompts(path)
    assert row["name"] == "Tom" and conversation == [{"role": "user", "content": "Who?"}]


@pytest.mark.parametrize("row, message", [
    ({"kind": "continue", "messages": [{"role": "user", "content": "x"}]}, "\"kind\" must be one of words, name"),
    ({"kind": "words", "messages": [{"role": "user", "content": "x"}]}, "needs \"words\""),
    ({"kind": "name", "name": "Tom", "messages": [{"role": "assistant", "content": "Tom"}]}, "no question"),
])
def test_bad_prompt_rows_are_errors_with_the_line(tmp_path, row, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(SlmError, match="line 1") as err:
        read_prompts(path)
    assert message in str(err.value)


def test_eval_assistant_scores_two_runs_side_by_side_and_as_json(tiny_run, tmp_path, capsys):
    make_instructions("demo", tmp_path / "chat.jsonl", tmp_path / "prompts.jsonl", held_out_value=6, max_stories=12)
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    argv = ["eval-assistant", str(tiny_run), str(other), "--prompts", str(tmp_path / "prompts.jsonl"),
            "--max-new-tokens", "6", "--device", "cpu"]
    assert main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["run", "words", "name", "ended"]
    assert [line.split()[0] for line in table[1:]] == [str(tiny_run), str(other)]
    assert table[1].split()[1:] == table[2].split()[1:]  # the same weights, greedy: the same scores
    assert main(argv + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sum(report["counts"].values()) == 6 and len(report["results"]) == 2
    for result in report["results"]:
        assert all(result[score] is None or 0 <= result[score] <= 1 for score in ("words", "name", "ended"))
