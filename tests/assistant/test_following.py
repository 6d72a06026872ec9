import dataclasses

import pytest
import torch

from slm.assistant import following
from slm.config import ModelConfig
from slm.data.template import conversation_ids
from slm.data.tokenizer import get_tokenizer
from slm.inference.engine import Engine
from slm.inference.sampling import SamplingSettings
from slm.model.gpt import GPT


@pytest.fixture(scope="module")
def gpt2_sized():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()


def ask(text: str) -> following.Plan:
    return following.plan(get_tokenizer(), [{"role": "user", "content": text}])


def test_a_plan_starts_the_answer_with_the_requested_sentence_and_ends_it_with_the_other():
    plan = ask('Write about Sam. Open with "Sam had a kite." The last sentence: Then they slept.')
    assert plan.start_ids == get_tokenizer().encode("Sam had a kite.")
    assert following.finish(plan, " It flew high. Sam ran") == "Sam had a kite. It flew high. Then they slept."
    # written by the model already: not twice
    assert following.finish(plan, " It flew. Then they slept.") == "Sam had a kite. It flew. Then they slept."
    assert following.finish(ask("Write about Sam."), " Sam ran") == " Sam ran"


def test_a_plan_asks_the_length_of_the_gold_stories_of_a_short_or_long_request():
    from slm.data.requests import LONG_WORDS, SHORT_WORDS
    from slm.inference.logit_bias import Length

    assert ask("A story about Sue. Keep it short.").length == Length(most=SHORT_WORDS)
    assert ask("Please write me a long one about a dragon.").length == Length(least=LONG_WORDS)
    assert ask("A story about a dragon with a long tail.").length == Length()  # the token budget's push only


def test_a_candidate_that_does_what_was_asked_beats_one_that_does_not(gpt2_sized):
    plan = ask("Write a story about Lily that uses the words ball and tree.")
    good = "Lily had a ball. She sat under a tree. She was happy."
    missing = "Lily had a cat. She sat on a mat. She was happy."
    loop = "Lily had a ball under a tree. She was happy. She was happy. She was happy."
    glued = "Lily had aBall under a tree. She was happy."
    texts = [missing, loop, good, glued]
    assert following.choose(gpt2_sized, get_tokenizer(), plan, texts) == 2


def test_a_forced_requested_word_costs_a_candidate_and_a_natural_one_does_not():
    constraints, text = {"words": ["ball"]}, "Lily had a ball. She was happy."
    natural = following.Surprise(2.0, [("Lily", 9.0), (" ball", 3.0)])
    forced = following.Surprise(2.0, [("Lily", 9.0), (" ball", 11.0)])
    assert following.score(constraints, text, natural) == following.score(constraints, text, dataclasses.replace(
        natural, words=[("Lily", 9.0), (" ball", following.WORD_LOSS)]))  # at or below WORD_LOSS: no cost
    assert following.score(constraints, text, forced) == pytest.approx(
        following.score(constraints, text, natural) - following.WORD_WEIGHT * (11.0 - following.WORD_LOSS))


def test_best_of_decodes_its_candidates_as_rows_of_one_batch_and_keeps_the_checkers_best(gpt2_sized, monkeypatch):
    tok, rows, seen = get_tokenizer(), [], {}
    step = Engine.step

    def counting_step(self):
        rows.append(len(self.rows))
        return step(self)

    def spying_choose(model, tokenizer, plan, texts):
        seen["texts"] = texts
        return choose(model, tokenizer, plan, texts)

    choose = following.choose
    monkeypatch.setattr(Engine, "step", counting_step)
    monkeypatch.setattr(following, "choose", spying_choose)
    plan = ask("Write a story about Tom with the word dog.")
    settings = SamplingSettings(temperature=1.0, max_new_tokens=12, best_of=4, word_bias=3.0)
    [answer] = following.answers(gpt2_sized, tok, [tok.encode("Tom")], [plan], settings,
                                 torch.Generator().manual_seed(0))
    assert max(rows) == 4  # the four candidates decoded together
    assert len(set(seen["texts"])) > 1
    scores = [following.score(plan.constraints, t, read)
              for t, read in zip(seen["texts"], following.surprise(gpt2_sized, tok, seen["texts"]))]
    assert answer.text == seen["texts"][max(range(4), key=scores.__getitem__)]
    again = following.answers(gpt2_sized, tok, [tok.encode("Tom")], [plan], settings, torch.Generator().manual_seed(0))
    assert again[0].text == answer.text  # seeded: reproducible


def test_a_words_surprise_is_the_sum_of_its_tokens_losses(gpt2_sized):
    tok = get_tokenizer()
    assert len(tok.encode(" zebra")) == 2
    [read] = following.surprise(gpt2_sized, tok, ["the the the the the"])
    assert read.spike >= read.mean_loss > 0
    [plain, odd] = following.surprise(gpt2_sized, tok, ["the the the the the the", "the the the zebra the the"])
    assert odd.spike > 1.5 * plain.spike  # a random model: every id costs about as much, and " zebra" is two
    assert [text for text, _ in odd.words] == ["the", " the", " the", " zebra", " the", " the"]
    zebra = dict(odd.words)[" zebra"]
    assert odd.word_loss(["Zebra"]) == zebra and odd.word_loss(["lion"]) is None
    assert odd.word_loss(["zebra", "the"]) == (zebra + odd.words[0][1]) / 2  # each word where it first comes


def test_best_of_is_checked(gpt2_sized):
    from slm.errors import SlmError

    with pytest.raises(SlmError, match="--best-of"):
        dataclasses.replace(SamplingSettings(), best_of=0).check(50257)
    assert SamplingSettings(temperature=0, best_of=4).best_of == 1  # greedy candidates would all be the same
    assert SamplingSettings(temperature=0.7, best_of=4).best_of == 4


def test_greedy_candidates_reach_further_for_the_words_and_penalize_repeats_harder():
    greedy = SamplingSettings(temperature=0, word_bias=8, word_reach=2, dry_multiplier=0.8, best_of=3)
    assert greedy.best_of == 3  # they differ, so there is something to choose from
    assert [(s.word_reach, s.dry_multiplier) for s in (following.candidate_settings(greedy, c) for c in range(3))] == [
        (2, 0.8), (4, 1.6), (6, pytest.approx(2.4))]
    sampled = SamplingSettings(temperature=0.7, word_reach=2, best_of=3)
    assert all(following.candidate_settings(sampled, c) == sampled for c in range(3))  # their draws differ


def test_a_greedy_best_of_answers_the_same_each_time_with_the_candidate_the_checker_prefers(gpt2_sized):
    tok = get_tokenizer()
    messages = [{"role": "user", "content": "Write a story about Tom. Use the words ball and tree."}]
    plan = following.plan(tok, messages)
    settings = SamplingSettings(temperature=0, word_bias=8, word_reach=2, dry_multiplier=0.8, best_of=3,
                                max_new_tokens=24)
    ids = conversation_ids(messages)
    first, again = (following.answers(gpt2_sized, tok, [ids], [plan], settings)[0].text for _ in range(2))
    candidates = [following.answers(gpt2_sized, tok, [ids], [plan], following.candidate_settings(
        dataclasses.replace(settings, best_of=1), c))[0].text for c in range(3)]
    assert first == again and first == candidates[following.choose(gpt2_sized, tok, plan, candidates)]
