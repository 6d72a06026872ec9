import json
import shutil

import pytest

from slm.assistant.evaluate import SCORES, answer_scores, read_prompts, summarize
from slm.assistant.instructions import make_instructions
from slm.cli import main
from slm.errors import SlmError

STORY = ('Lily had a red ball. She took the ball to the park. "Look!" she said to her mom. A big tree stood there. '
         'Lily was happy and played all day.')


def test_a_story_that_follows_the_request_scores_full_and_a_word_list_does_not():
    constraints = {"words": ["ball", "tree", "happy"], "name": "Lily", "dialogue": True}
    good = answer_scores(constraints, STORY, ended=True)
    assert {k: good[k] for k in ("words", "name", "dialogue", "story", "ended")} == {
        "words": 1.0, "name": 1.0, "dialogue": 1.0, "story": 1.0, "ended": 1.0}
    assert good["n_words"] == 30 and good["distinct4"] == 1.0
    word_list = answer_scores(constraints, "Lily\nball\ntree\nhappy", ended=True)
    assert word_list["words"] == 1.0 and word_list["story"] == 0.0  # uses the words, but is no story
    loop = answer_scores(constraints, "Lily had a ball. " * 30, ended=False)
    assert loop["distinct4"] < 0.2 and loop["ended"] == 0.0


def test_scores_are_averaged_per_wording_over_the_answers_that_have_them():
    summary = summarize([("seen", {"words": 1.0, "story": 1.0}), ("held_out", {"words": 0.0, "name": 1.0, "story": 0.0}),
                         ("seen", {"words": 0.5, "story": 1.0})])
    assert summary["all"]["words"] == pytest.approx(0.5) and summary["all"]["name"] == 1.0
    assert summary["seen"]["words"] == 0.75 and summary["seen"]["name"] is None
    assert summary["held_out"]["words"] == 0.0 and summary["held_out"]["story"] == 0.0
    assert set(summary["all"]) == set(SCORES)


def test_the_reference_answer_is_not_part_of_the_prompt(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"kind": "story", "constraints": {"name": "Tom"}, "messages": [
        {"role": "user", "content": "A story about Tom."}, {"role": "assistant", "content": "Tom ran."}]}) + "\n")
    [(row, conversation)] = read_prompts(path)
    assert row["constraints"] == {"name": "Tom"} and conversation == [{"role": "user", "content": "A story about Tom."}]


@pytest.mark.parametrize("row, message", [
    ({"kind": "story", "messages": [{"role": "user", "content": "x"}]}, "\"constraints\" must be an object"),
    ({"constraints": {"colour": "red"}, "messages": [{"role": "user", "content": "x"}]}, "some of words, name"),
    ({"constraints": {"words": "ball"}, "messages": [{"role": "user", "content": "x"}]}, "non-empty list"),
    ({"constraints": {"name": "Tom"}, "messages": [{"role": "assistant", "content": "Tom"}]}, "no question"),
])
def test_bad_prompt_rows_are_errors_with_the_line(tmp_path, row, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(SlmError, match="line 1") as err:
        read_prompts(path)
    assert message in str(err.value)


def test_eval_assistant_scores_two_runs_side_by_side_per_wording_and_as_json(tiny_run, tmp_path, capsys):
    make_instructions("demo", tmp_path / "chat.jsonl", tmp_path / "prompts.jsonl", max_stories=12, max_prompts=6)
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    argv = ["eval-assistant", str(tiny_run), str(other), "--prompts", str(tmp_path / "prompts.jsonl"),
            "--max-new-tokens", "6", "--micro-batch-size", "4", "--device", "cpu"]
    assert main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["run", "wording", *SCORES]
    assert [line.split()[:2] for line in table[1:]] == [[str(run), w] for run in ("gold", tiny_run, other)
                                                        for w in ("all", "seen", "held_out")]
    assert [line.split()[2:] for line in table[4:7]] == [line.split()[2:] for line in table[7:]]  # same weights
    assert [float(x) for x in table[1].split()[2:4]] == [1.0, 1.0]  # the reference stories do what they were asked
    assert main(argv + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == {"seen": 3, "held_out": 3} and len(report["results"]) == 3
    for result in report["results"]:
        for scores in result["scores"].values():
            assert all(scores[s] is None or 0 <= scores[s] <= 1 for s in SCORES
                       if s not in ("n_words", "loss", "first_words", "word_loss"))
            assert scores["word_loss"] is None or scores["word_loss"] > 0  # a loss, where the answer wrote a word
