import json
import random

import pytest

from slm.chat import read_conversations
from slm.cli import main
from slm.errors import SlmError
from slm.instructions import NAME_QUESTION, main_character, make_instructions, story_row, uses_word

CONTINUE = "Continue this story: "
STARTS = "Write a story that starts with: "


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def story_of(row):
    """The story a row was made from, its whitespace normalized."""
    question, answer = (m["content"] for m in row["messages"])
    text = {"words": answer, "starts": answer, "continue": question.removeprefix(CONTINUE) + " " + answer,
            "name": question.removesuffix(NAME_QUESTION)}
    return " ".join(text[row["kind"]].split())


@pytest.fixture(scope="module")
def demo_instructions(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instructions")
    make_instructions("demo", folder / "chat.jsonl", folder / "prompts.jsonl", held_out_value=0.2, max_stories=300)
    return folder / "chat.jsonl", folder / "prompts.jsonl"


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_data(tmp_path, demo_instructions):
    chat, prompts = demo_instructions
    make_instructions("demo", tmp_path / "a.jsonl", tmp_path / "p.jsonl", held_out_value=0.2, max_stories=300)
    assert (tmp_path / "a.jsonl").read_bytes() == chat.read_bytes()
    assert (tmp_path / "p.jsonl").read_bytes() == prompts.read_bytes()
    make_instructions("demo", tmp_path / "b.jsonl", held_out_value=0, seed=7, max_stories=300)
    assert (tmp_path / "b.jsonl").read_bytes() != chat.read_bytes()


def test_every_answer_is_backed_by_its_story(demo_instructions):
    chat, prompts = demo_instructions
    made = rows(chat) + rows(prompts)
    assert {row["kind"] for row in made} == {"words", "continue", "starts", "name"}
    for row in made:
        question, answer = (m["content"] for m in row["messages"])
        if row["kind"] == "words":
            assert len(row["words"]) == 3 and all(uses_word(answer, word) for word in row["words"])
            assert all(word in question for word in row["words"])
        elif row["kind"] == "name":
            assert question.endswith(NAME_QUESTION) and answer == row["name"] and uses_word(question, answer)
        elif row["kind"] == "starts":
            assert answer.startswith(question.removeprefix(STARTS))
        else:  # cut between two sentences
            assert question[-1] in '.!?"' and (answer[0].isupper() or answer[0] == '"')


def test_held_out_prompts_come_from_stories_disjoint_from_the_training_ones(demo_instructions):
    chat, prompts = demo_instructions
    held = rows(prompts)
    assert {row["kind"] for row in held} == {"words", "name"}
    assert 30 <= len(held) <= 90  # a fifth of 300 stories
    assert not {story_of(row) for row in held} & {story_of(row) for row in rows(chat)}


def test_the_outputs_are_chat_data_that_finetune_reads(demo_instructions):
    chat, prompts = demo_instructions
    assert len(read_conversations(chat)) == len(rows(chat))
    assert len(read_conversations(prompts)) == len(rows(prompts))


def test_a_whole_number_holds_out_the_first_stories(tmp_path):
    make_instructions("demo", tmp_path / "c.jsonl", tmp_path / "p.jsonl", held_out_value=5, max_stories=20)
    assert len(rows(tmp_path / "p.jsonl")) == 5 and len(rows(tmp_path / "c.jsonl")) == 15


@pytest.mark.parametrize("story, name", [
    ("Once upon a time there was a girl named Lily. Lily liked Tom.", "Lily"),
    ("There was a daisy. Her name was Daisy. Daisy saw Max.", "Daisy"),
    ("The dog ran. Then Max and Sam played, and Sam won. Mom said Sam was fast.", "Sam"),
    ('Mom smiled. "Come here, Tom," said Dad to Tom.', "Tom"),
    ("Once upon a time there was a cat. The cat was happy.", None),
])
def test_the_main_character_is_found_by_name_or_by_frequency(story, name):
    assert main_character(story) == name


def test_words_are_matched_whole_and_without_case():
    assert uses_word("The Ball rolled.", "ball") and uses_word("ball", "BALL")
    assert not uses_word("balloons everywhere", "ball")


def test_a_story_without_a_name_gets_an_unnamed_words_prompt():
    row = story_row("The cat found a shiny red ribbon near the garden gate.", random.Random(0), ("words",))
    assert row["name"] is None
    assert row["messages"][0]["content"].startswith("Write a story that uses the words ")


def test_existing_outputs_are_kept_unless_forced_and_no_temporary_file_remains(tmp_path):
    out = tmp_path / "chat.jsonl"
    out.write_text("keep me")
    with pytest.raises(SlmError, match="--force"):
        make_instructions("demo", out, max_stories=10)
    assert out.read_text() == "keep me"
    make_instructions("demo", out, max_stories=10, force=True)
    assert len(rows(out)) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]


@pytest.mark.parametrize("argv, message", [
    (["--held-out", "5"], "--held-out needs --prompts-out"),
    (["--prompts-out", "p.jsonl", "--held-out", "2.5"], "a fraction in [0, 1) or a whole number"),
    (["--prompts-out", "p.jsonl", "--held-out", "-1"], "a fraction in [0, 1) or a whole number"),
    (["--prompts-out", "chat.jsonl"], "must be different files"),
    (["--prompts-out", "p.jsonl", "--held-out", "30"], "gave no training conversations"),
    (["--max-stories", "-1"], "--max-stories must be 0"),
])
def test_bad_make_instructions_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(["make-instructions", "demo", "--out", "chat.jsonl", "--max-stories", "20", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slm: error: ") and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
