"""The continuous-batching engine: rows join and leave a running batch, each decoding as it would alone."""

import dataclasses

import pytest
import torch

from conftest import CFG, lively_model
from slm.data.tokenizer import get_tokenizer
from slm.errors import SlmError
from slm.inference.engine import Engine
from slm.inference.generate import decode
from slm.inference.sampling import SamplingSettings

GREEDY = SamplingSettings(temperature=0, max_new_tokens=40)  # past the 24-token window: every row slides


def run(engine: Engine, steps: int | None = None) -> dict:
    """Step the engine `steps` times (None: until it is empty); each owner's text and last delta so far."""
    texts = getattr(engine, "texts", {})
    engine.texts = texts
    while engine.rows and (steps is None or steps > 0):
        for row, delta in engine.step():
            text, _ = texts.get(row.owner, ("", None))
            texts[row.owner] = (text + delta.text, delta)
        steps = None if steps is None else steps - 1
    return texts


def alone(model, prompt, settings, seed=None, words=None):
    engine = Engine(model, get_tokenizer(), 1, torch.Generator().manual_seed(0))
    engine.add(prompt, settings, seed, words, owner="alone")
    return run(engine)["alone"]


@pytest.mark.parametrize("vocab_head", [0, 10], ids=["full-head", "compact-head"])
def test_rows_joining_a_busy_batch_decode_as_they_would_alone(vocab_head):
    model, tokenizer = lively_model(vocab_head), get_tokenizer()
    rows = {  # owner -> (prompt, settings, seed): sampling and greedy, seeded, penalised, stopped, short
        "greedy": ([5, 17, 3], GREEDY, None),
        "seeded": ([9], SamplingSettings(temperature=1.0, top_k=20, max_new_tokens=30), 11),
        "nucleus": ([4, 4], SamplingSettings(temperature=0.7, top_p=0.9, max_new_tokens=35), 12),
        "penalised": ([1, 2, 3, 4, 5], SamplingSettings(temperature=0, repetition_penalty=1.5, max_new_tokens=30),
                      None),
        "short": ([60, 61], SamplingSettings(temperature=0, max_new_tokens=3), None),
        "late greedy": ([8, 9, 10, 11], GREEDY, None),
    }
    engine = Engine(model, tokenizer, max_rows=4)
    for owner in ("greedy", "seeded"):
        engine.add(*rows[owner][:2], seed=rows[owner][2], owner=owner)
    run(engine, 5)
    for owner in ("nucleus", "penalised"):  # join at step 6, with prompts of different lengths
        engine.add(*rows[owner][:2], seed=rows[owner][2], owner=owner)
    run(engine, 2)
    assert len(engine.rows) == 4
    with pytest.raises(ValueError, match="full"):
        engine.add([1], GREEDY)
    engine.remove(next(row for row in engine.rows if row.owner == "nucleus"))  # its client left
    engine.add(*rows["short"][:2], owner="short")
    run(engine, 4)
    assert len(engine.rows) == 3  # "short" finished after 3 ids and freed its slot
    engine.add(*rows["late greedy"][:2], owner="late greedy")
    texts = run(engine)
    assert set(texts) == set(rows)
    for owner, (prompt, settings, seed) in rows.items():
        if owner != "nucleus":
            assert texts[owner] == alone(model, prompt, settings, seed), owner
    assert texts["short"][1].finish_reason == "length" and texts["short"][1].tokens == 3


def test_a_row_in_a_batch_decodes_as_full_recompute_and_slides_its_window_as_decode_does():
    model = lively_model()
    prompt = [5, 17, 3]
    settings = dataclasses.replace(GREEDY, max_new_tokens=2 * CFG.block_size)  # it slides twice
    width = CFG.block_size - len(prompt) + 1  # ids until the window is full
    recomputed = torch.cat(list(decode(model, [prompt], settings, use_cache=False))).tolist()
    cached = torch.cat(list(decode(model, [prompt], settings))).tolist()  # keeps the newest half at a slide
    engine = Engine(model, get_tokenizer(), max_rows=3)
    engine.add([40, 41, 42, 43, 44, 45, 46], GREEDY, owner="other")  # a longer row beside it
    run(engine, 2)
    engine.add(prompt, settings, owner="row")
    ids = []
    while any(row.owner == "row" for row in engine.rows):
        row = next(row for row in engine.rows if row.owner == "row")
        engine.step()
        ids.append(row.next_id)
    assert ids[:width] == recomputed[:width] and len(set(ids[:width])) > 3
    assert ids == cached and ids != recomputed


def test_a_bad_row_is_refused_before_it_joins():
    engine = Engine(lively_model(), get_tokenizer(), max_rows=2)
    with pytest.raises(SlmError, match="at least one token"):
        engine.add([], GREEDY)
    with pytest.raises(SlmError, match="--top-p"):
        engine.add([1], SamplingSettings(top_p=0))
    assert not engine.rows


def test_rows_with_logit_biases_of_their_own_pick_in_one_call_each_with_its_own_bias():
    from slm.inference.engine import SharedPick
    from slm.inference.logit_bias import WordForms

    model, tokenizer = lively_model(10), get_tokenizer()
    settings = dataclasses.replace(GREEDY, word_bias=30.0, dry_multiplier=0.8, repetition_penalty=1.2)

    def name(token_id: int) -> list[WordForms]:  # a one-id name of the tiny vocabulary, pushed from the start
        return [WordForms(tokenizer.decode([token_id]), True, *[frozenset({token_id})] * 3, {})]

    words = {"42": name(42), "77": name(77), "none": []}
    engine = Engine(model, tokenizer, max_rows=3)
    for owner, forms in words.items():
        engine.add([5, 17, 3], settings, words=forms, owner=owner)
    assert len({row.pick for row in engine.rows}) == 1 and isinstance(engine.rows[0].pick, SharedPick)
    texts = run(engine)
    assert tokenizer.decode([42]) in texts["42"][0] and tokenizer.decode([77]) in texts["77"][0]
    for owner, forms in words.items():
        assert texts[owner] == alone(model, [5, 17, 3], settings, words=forms), owner
