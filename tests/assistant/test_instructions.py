import json
from itertools import islice

import pytest

from slm.assistant.constraints import check
from slm.assistant.instructions import make_instructions
from slm.cli import main
from slm.data.requests import HELD_OUT, PHRASINGS, main_character, uses_word
from slm.data.stories import demo_documents
from slm.data.template import read_conversations
from slm.errors import SlmError


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """300 demo stories as a .txt file: a source with no validation split of its own."""
    path = tmp_path_factory.mktemp("corpus") / "stories.txt"
    path.write_text("\n<|endoftext|>\n".join(islice(demo_documents("train"), 300)) + "\n")
    return path


@pytest.fixture(scope="module")
def made(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("instructions")
    make_instructions(str(corpus), folder / "chat.jsonl", folder / "prompts.jsonl", held_out_value=0.2, epochs=2)
    return folder / "chat.jsonl", folder / "prompts.jsonl"


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_data(tmp_path, corpus, made):
    chat, prompts = made
    make_instructions(str(corpus), tmp_path / "a.jsonl", tmp_path / "p.jsonl", held_out_value=0.2, epochs=2)
    assert (tmp_path / "a.jsonl").read_bytes() == chat.read_bytes()
    assert (tmp_path / "p.jsonl").read_bytes() == prompts.read_bytes()
    make_instructions(str(corpus), tmp_path / "b.jsonl", held_out_value=0.2, seed=7, epochs=2)
    assert (tmp_path / "b.jsonl").read_bytes() != chat.read_bytes()


def test_every_kind_is_made_and_every_answer_satisfies_its_request(made):
    chat, prompts = made
    made_rows = rows(chat) + rows(prompts)
    assert {row["kind"] for row in rows(chat)} == {"story", "continue", "who", "follow_up"}
    for row in made_rows:
        question, answer = row["messages"][-2]["content"], row["messages"][-1]["content"]
        if row["kind"] in ("story", "follow_up"):
            assert all(score == 1.0 for score in check(row["constraints"], answer).values()), question
            assert all(word in question for word in row["constraints"].get("words", []))
        elif row["kind"] == "who":
            assert answer == row["constraints"]["name"] and uses_word(question, answer)
        else:  # continue: the question holds the first sentences, the answer the rest
            assert question[-1] in '.!?"' and (answer[0].isupper() or answer[0] == '"')


def test_each_epoch_draws_fresh_requests_for_the_same_stories(made):
    chat, _ = made
    by_epoch = rows(chat)
    half = len(by_epoch) // 2
    first, second = by_epoch[:half], by_epoch[half:]
    assert len(first) == len(second)
    assert sum(a["messages"][0]["content"] != b["messages"][0]["content"] for a, b in zip(first, second)) > half / 2


def test_held_out_wordings_never_appear_in_training_rows_and_half_the_prompts_use_them(made):
    chat, prompts = made
    held_phrasings = [p.split("{")[0].strip() for options in PHRASINGS.values() for p in options[-HELD_OUT:]]
    for row in rows(chat):
        for message in row["messages"]:
            if message["role"] == "user":
                assert not [p for p in held_phrasings if len(p) > 8 and p in message["content"]], message
    wordings = [row["wording"] for row in rows(prompts)]
    assert set(wordings) == {"seen", "held_out"} and abs(wordings.count("seen") - wordings.count("held_out")) <= 1


def test_held_out_prompts_come_from_stories_disjoint_from_the_training_ones(made):
    chat, prompts = made
    held = {row["messages"][-1]["content"] for row in rows(prompts)}
    assert all(row["kind"] == "story" for row in rows(prompts)) and 30 <= len(held) <= 90  # a fifth of 300
    trained = {row["messages"][-1]["content"] for row in rows(chat) if row["kind"] in ("story", "follow_up")}
    assert not held & trained


def test_a_source_with_a_validation_split_gives_prompts_from_it(tmp_path):
    make_instructions("demo", tmp_path / "c.jsonl", tmp_path / "p.jsonl", max_stories=20, max_prompts=10)
    validation = set(islice(demo_documents("validation"), 10))
    assert len(rows(tmp_path / "c.jsonl")) == 20
    assert {row["messages"][-1]["content"] for row in rows(tmp_path / "p.jsonl")} <= validation


def test_the_outputs_are_chat_data_that_finetune_reads(made):
    chat, prompts = made
    assert len(read_conversations(chat)) == len(rows(chat))
    assert len(read_conversations(prompts)) == len(rows(prompts))


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


def test_existing_outputs_are_kept_unless_forced_and_no_temporary_file_remains(tmp_path):
    out = tmp_path / "chat.jsonl"
    out.write_text("keep me")
    with pytest.raises(SlmError, match="--force"):
        make_instructions("demo", out, max_stories=10)
    assert out.read_text() == "keep me"
    make_instructions("demo", out, max_stories=10, force=True)
    assert len(rows(out)) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]


def test_a_run_killed_between_its_renames_is_finished_by_a_rerun_but_other_prompts_need_force(tmp_path):
    out, prompts = tmp_path / "chat.jsonl", tmp_path / "prompts.jsonl"
    make_instructions("demo", out, prompts, held_out_value=5, max_stories=20)
    whole = {path: path.read_bytes() for path in (out, prompts)}
    out.unlink()  # as a kill after the prompts' rename and before --out's leaves it
    make_instructions("demo", out, prompts, held_out_value=5, max_stories=20)
    assert {path: path.read_bytes() for path in (out, prompts)} == whole
    out.unlink()
    prompts.write_text("my own prompts\n")
    with pytest.raises(SlmError, match="prompts.jsonl already exists with other prompts; pass --force"):
        make_instructions("demo", out, prompts, held_out_value=5, max_stories=20)
    assert prompts.read_text() == "my own prompts\n" and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


@pytest.mark.parametrize("argv, message", [
    (["--prompts-out", "p.jsonl", "--held-out", "2.5"], "a fraction in [0, 1) or a whole number"),
    (["--prompts-out", "p.jsonl", "--held-out", "-1"], "a fraction in [0, 1) or a whole number"),
    (["--prompts-out", "chat.jsonl"], "must be different files"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--max-stories", "-1"], "--max-stories must be 0"),
])
def test_bad_make_instructions_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(["make-instructions", "demo", "--out", "chat.jsonl", "--max-stories", "20", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slm: error: ") and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
