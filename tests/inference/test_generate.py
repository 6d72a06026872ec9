import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import CFG, compact_model, lively_model, tiny_config
from slm.cli import main
from slm.config import ModelConfig
from slm.data.tokenizer import EOT_ID, StopText, get_tokenizer
from slm.errors import SlmError
from slm.inference.engine import complete, stream
from slm.inference.generate import decode, generate, prompt_ids
from slm.inference.kv_cache import SlotCache
from slm.inference.sampling import (CompactSampler, SamplingSettings, draw, make_picker, penalize_repetition,
                                    sample_next, top_k_filter, top_p_filter)
from slm.model.gpt import GPT
from slm.runs.checkpoint import checkpoint_dir, load_model

GPT2_CFG = ModelConfig(vocab_size=50257, block_size=32, n_layer=2, n_head=2, n_embd=32)
GREEDY = SamplingSettings(temperature=0, max_new_tokens=15)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(CFG).eval()


def test_greedy_decoding_with_the_cache_equals_full_recompute(model):
    prompt = torch.randint(0, 101, (3, 5), generator=torch.Generator().manual_seed(1))
    slow = generate(model, prompt, 15, temperature=0, use_cache=False)
    fast = generate(model, prompt, 15, temperature=0, use_cache=True)
    assert torch.equal(slow, fast)


@pytest.fixture(scope="module", params=[0, 64], ids=["full-head", "compact-head"])
def trained(request, tiny_data, tmp_path_factory) -> Path:
    """A tiny-preset run trained 60 steps, with a full head (0) or a compact head of 64 ids."""
    from slm.training.loop import start

    run = tmp_path_factory.mktemp("trained") / f"head{request.param}"
    cfg = tiny_config(tiny_data, max_steps=60)
    start(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_head=request.param)), run)
    return run


@pytest.mark.parametrize("vocab_head", [0, 10], ids=["full-head", "compact-head"])
@pytest.mark.parametrize("prompt", [[1], [5, 17, 3, 99, 42]], ids=["one-id", "five-ids"])
def test_batch_one_greedy_text_with_the_cache_equals_full_recompute_over_a_whole_window(vocab_head, prompt):
    """The path `slm generate --temperature 0` takes by default: float32, one prompt, no padding, so no mask,
    each step attending to every cached slot; for a compact head, the one-argmax greedy pick."""
    model = lively_model(vocab_head)
    settings = SamplingSettings(temperature=0, max_new_tokens=CFG.block_size - len(prompt) + 1)  # a full window
    fast, slow = (torch.cat(list(decode(model, [prompt], settings, use_cache=c))).tolist() for c in (True, False))
    assert fast == slow
    assert len(set(fast)) > 3


def test_the_cached_greedy_pick_equals_the_recomputed_one_at_every_position_of_a_story(trained):
    """Greedy text from a briefly trained model soon repeats one id; along a story each step meets a new
    context, and the cached step's pick must still be the recompute's."""
    model, cfg, _ = load_model(checkpoint_dir(trained), "cpu", torch.float32)
    ids = get_tokenizer().encode("Once upon a time, there was a little girl named Lily. She liked to play with "
                                 "her red ball in the park. One day, she saw a big dog.")[:cfg.model.block_size]
    pick = make_picker(model, SamplingSettings(temperature=0), None, seen=None)
    cache, picks = SlotCache(model, rows=1), []
    with torch.no_grad():
        for t in range(len(ids)):
            fast = pick(model.hidden(torch.tensor([ids[t:t + 1]]), kv_cache=cache.step([t]))[:, -1])
            slow = pick(model.hidden(torch.tensor([ids[:t + 1]]))[:, -1])
            assert fast == slow, t
            picks.append(slow.item())
    assert len(set(picks)) > 1  # the contexts really differ: the pick changes along the story


def test_cached_logits_match_full_forward_within_1e_5(model):
    ids = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(2))
    full, _ = model(ids)
    cache = SlotCache(model, rows=2)
    prefill, _ = model(ids[:, :8], kv_cache=cache.prefill([0, 1]))
    steps = [prefill]
    for t in range(8, 20):
        logits, _ = model(ids[:, t:t + 1], kv_cache=cache.step([t, t]))
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_generation_past_the_context_window_slides_and_keeps_going(model):
    out = generate(model, torch.zeros(1, 3, dtype=torch.long), 3 * CFG.block_size, temperature=0)
    assert out.shape == (1, 3 + 3 * CFG.block_size)


def test_top_k_keeps_exactly_k_ids_even_when_logits_tie():
    logits = torch.zeros(1, 50)  # every id ties
    g = torch.Generator().manual_seed(0)
    seen = {sample_next(logits, SamplingSettings(top_k=3), g).item() for _ in range(300)}
    assert len(seen) == 3


def test_top_k_never_samples_outside_the_k_most_likely_ids():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    allowed = logits.topk(5, dim=-1).indices
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        ids = sample_next(logits, SamplingSettings(temperature=2.0, top_k=5), g)
        assert all(ids[b] in allowed[b] for b in range(4))


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, 0.0, 0.0]])
    assert sample_next(logits, SamplingSettings(temperature=0)).tolist() == [1, 0]


def test_the_same_seed_gives_the_same_text_twice_in_one_process(tiny_run, capsys):
    argv = ["generate", str(tiny_run), "--prompt", "Tom had", "--max-new-tokens", "20", "--seed", "5"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first
    assert first.startswith("Tom had") and len(first) > len("Tom had")
    assert main(argv[:-1] + ["6", "--temperature", "2.0"]) == 0
    assert capsys.readouterr().out != first


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "-1"], "--temperature must be 0 (greedy) or at least 0.000001"),
    (["--temperature", "1e-9"], "--temperature must be 0 (greedy) or at least 0.000001"),  # overflows the logits
    (["--top-k", "0"], "--top-k must be between 1 and 50257"),
    (["--top-k", "50258"], "--top-k must be between 1 and 50257"),
    (["--temperature", "nan"], "--temperature must be 0 (greedy) or at least"),
    (["--top-p", "0"], "--top-p must be between 0.000001 and 1"),
    (["--top-p", "1e-50"], "--top-p must be between 0.000001 and 1"),  # rounds to 0 in float32
    (["--top-p", "1.5"], "--top-p must be between 0.000001 and 1"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be at least 0.000001"),
    (["--repetition-penalty", "1e-40"], "--repetition-penalty must be at least 0.000001"),
    (["--repetition-penalty", "-1.2"], "--repetition-penalty must be at least 0.000001"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be between"),
    (["--max-new-tokens", "100001"], "--max-new-tokens must be between"),
    (["--stop", ""], "--stop must not be empty"),
    (["--num-samples", "0"], "--num-samples must be at least 1"),
])
def test_bad_sampling_settings_are_one_line_errors(tiny_run, capsys, argv, message):
    assert main(["generate", str(tiny_run)] + argv) == 2
    out, err = capsys.readouterr()
    assert out == ""  # checked before anything is written
    assert err.startswith("slm: error: ") and message in err and err.count("\n") == 1


def test_the_smallest_sampling_numbers_taken_still_sample_ids(tiny_run, capsys):
    smallest = ["--temperature", "1e-6", "--top-p", "1e-6", "--repetition-penalty", "1e-6"]
    assert main(["generate", str(tiny_run), "--prompt", "Tom had", "--max-new-tokens", "5", *smallest]) == 0
    assert len(capsys.readouterr().out) > len("Tom had")


def test_a_prompt_longer_than_the_context_keeps_its_end_with_a_warning(capsys):
    tok = get_tokenizer()
    ids = prompt_ids(tok, "one two three four five six seven eight", block_size=4)
    assert ids == tok.encode(" six seven eight")
    assert "keeping its last 3" in capsys.readouterr().err


def test_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_sampling_settings_accept_the_edges_of_every_range():
    SamplingSettings(temperature=0.0, top_k=None, top_p=1.0, max_new_tokens=1).check(50257)
    SamplingSettings(temperature=1.5, top_k=50257, top_p=1e-6, repetition_penalty=1e-6, max_new_tokens=100_000,
                     stop=("\n", "The end.")).check(50257)
    with pytest.raises(SlmError, match="--max-new-tokens"):
        SamplingSettings(max_new_tokens=100_001).check(50257)


# ---- batches of prompts of different lengths ------------------------------------------------------------------

PROMPTS = [[5, 17], [3, 99, 42, 7, 0], [11, 12, 13, 14, 15, 16, 17, 18, 19]]  # lengths 2, 5, 9


def test_a_left_padded_batch_decodes_each_row_as_its_prompt_alone_without_cache(model):
    batch = torch.stack(list(decode(model, PROMPTS, GREEDY)), dim=1)  # (3, 15)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, torch.tensor([prompt]), 15, temperature=0, use_cache=False)[0, len(prompt):]
        assert batch[row].tolist() == alone.tolist()


def test_rows_of_different_lengths_in_one_step_each_get_their_own_logits_within_1e_5(model):
    cache = SlotCache(model, rows=len(PROMPTS))
    contexts = [list(p) for p in PROMPTS]
    last = [model(torch.tensor([p]), kv_cache=cache.prefill([row]))[0][0, -1] for row, p in enumerate(PROMPTS)]
    for _ in range(5):  # one id at a time, each row at its own position, under a mask
        new = torch.stack(last).argmax(dim=-1, keepdim=True)
        step = cache.step([len(context) for context in contexts])
        for context, next_id in zip(contexts, new[:, 0].tolist()):
            context.append(next_id)
        logits, _ = model(new, kv_cache=step)
        last = list(logits[:, -1])
        for row, context in enumerate(contexts):
            alone, _ = model(torch.tensor([context]))
            torch.testing.assert_close(logits[row, -1], alone[0, -1], atol=1e-5, rtol=0)


def test_a_batch_of_different_lengths_slides_its_windows_and_keeps_going(model):
    steps = list(decode(model, PROMPTS, SamplingSettings(temperature=0, max_new_tokens=3 * CFG.block_size)))
    assert len(steps) == 3 * CFG.block_size and all(ids.shape == (3,) for ids in steps)


@pytest.mark.parametrize("prompts", [[[5, 17, 3]], PROMPTS], ids=["one-row", "three-lengths"])
def test_a_full_window_slides_to_its_newest_half_and_decodes_as_recompute_from_there(prompts):
    model, block = lively_model(), CFG.block_size
    second = block - block // 2 + 1  # ids a row gets from its newest half until the window is full again
    steps = block - min(map(len, prompts)) + 1 + second
    ids = torch.stack(list(decode(model, prompts, SamplingSettings(temperature=0, max_new_tokens=steps))), 1)
    for prompt, row in zip(prompts, ids.tolist()):
        first = block - len(prompt) + 1  # ids this row gets before its window is full
        context = torch.tensor([(prompt + row[:first])[-(block // 2):]])
        expected = generate(model, context, second, temperature=0, use_cache=False)[0, block // 2:].tolist()
        assert row[first:first + second] == expected
        assert len(set(row[first:first + second])) > 3


def test_full_recompute_refuses_prompts_of_different_lengths_and_empty_prompts_are_errors(model):
    with pytest.raises(ValueError, match="one length"):
        decode(model, PROMPTS, GREEDY, use_cache=False)
    with pytest.raises(SlmError, match="at least one token"):
        decode(model, [[1], []], GREEDY)


# ---- sampling filters on hand-made logits ---------------------------------------------------------------------

def kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in logits]


def test_top_p_keeps_the_smallest_set_of_most_likely_ids_that_reaches_p():
    logits = torch.tensor([[0.1, 0.6, 0.05, 0.25]]).log()  # most likely first: 1, 3, 0, 2
    assert kept(top_p_filter(logits, 0.5)) == [{1}]
    assert kept(top_p_filter(logits, 0.8)) == [{1, 3}]
    assert kept(top_p_filter(logits, 0.9)) == [{1, 3, 0}]
    assert kept(top_p_filter(logits, 0.01)) == [{1}]  # always at least the most likely id
    out = top_p_filter(logits, 0.9)
    assert torch.equal(out[0, [1, 3, 0]], logits[0, [1, 3, 0]])  # the kept logits are unchanged


def test_top_p_keeps_the_same_ids_whether_its_nucleus_ends_among_the_likeliest_candidates_or_past_them():
    from slm.inference.sampling import TOP_P_CANDIDATES

    def sorted_nucleus(logits: torch.Tensor, p: float) -> list[set[int]]:  # the definition, by a full sort
        probs = logits.softmax(-1)
        order = probs.argsort(dim=-1, descending=True, stable=True)
        before = probs.gather(-1, order).cumsum(-1) - probs.gather(-1, order)
        return [set(row[mask].tolist()) for row, mask in zip(order, before < p)]

    peaked, flat = torch.randn(2, 50257, generator=torch.Generator().manual_seed(0)) * torch.tensor([[8.0], [0.1]])
    for logits, p in ((peaked[None], 0.9), (flat[None], 0.9), (torch.stack([peaked, flat]), 0.5)):
        assert kept(top_p_filter(logits, p)) == sorted_nucleus(logits, p)
    assert len(kept(top_p_filter(flat[None], 0.9))[0]) > TOP_P_CANDIDATES  # past the candidates: sorted


def test_top_p_of_one_keeps_every_id_even_a_very_unlikely_one():
    logits = torch.tensor([[30.0, 0.0, -30.0]])
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_top_p_keeps_exactly_the_needed_number_of_tied_ids_row_by_row():
    logits = torch.stack([torch.zeros(4), torch.tensor([0.7, 0.1, 0.1, 0.1]).log()])
    assert [len(ids) for ids in kept(top_p_filter(logits, 0.5))] == [2, 1]
    assert [len(ids) for ids in kept(top_p_filter(logits, 0.6))] == [3, 1]


def test_top_k_filter_keeps_exactly_k_ids_with_their_logits():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    out = top_k_filter(logits, 2)
    assert len(kept(out)[0]) == 2 and kept(out)[0] <= {1, 2, 3}
    assert torch.equal(out[torch.isfinite(out)], torch.tensor([3.0, 3.0]))


def test_sample_next_applies_top_k_before_top_p():
    # top-k 3 leaves 0.4, 0.3, 0.2 -> renormalized 0.44, 0.33, 0.22; top-p 0.7 then keeps ids 0 and 1.
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    g = torch.Generator().manual_seed(0)
    settings = SamplingSettings(top_k=3, top_p=0.7)
    assert {sample_next(logits, settings, g).item() for _ in range(200)} == {0, 1}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_ids():
    logits = torch.tensor([[2.0, -2.0, 0.5, -0.5, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    assert penalize_repetition(logits, seen, 2.0).tolist() == [[1.0, -4.0, 0.5, -0.5, 0.0]]
    assert penalize_repetition(logits, seen, 0.5).tolist() == [[4.0, -1.0, 0.5, -0.5, 0.0]]  # below 1 favours them


def test_the_repetition_penalty_covers_the_prompt_and_every_generated_id(model):
    settings = SamplingSettings(temperature=0, repetition_penalty=3.0, max_new_tokens=12)
    fast = torch.stack(list(decode(model, PROMPTS, settings)), dim=1)
    for row, prompt in enumerate(PROMPTS):  # the obvious loop: recompute, penalize what the context holds
        context = list(prompt)
        for _ in range(12):
            logits, _ = model(torch.tensor([context]))
            seen = torch.zeros(1, CFG.vocab_size, dtype=torch.bool)
            seen[0, context] = True
            context.append(penalize_repetition(logits[:, -1], seen, 3.0).argmax().item())
        assert fast[row].tolist() == context[len(prompt):]


# ---- text: stop strings, finish reasons, seeds ----------------------------------------------------------------

def test_a_stop_string_split_across_pieces_is_held_back_and_never_shown():
    text = StopText(("upon",))
    assert text.add("Once up") == ("Once ", False)  # "up" could begin "upon": held
    assert text.add("on a ti") == ("", True)
    text = StopText(("upon", "me."))
    assert text.add("Once up") == ("Once ", False)
    assert text.add("side m") == ("upside ", False)  # "up" was not the start of "upon" after all
    assert text.add("e") == ("", False)
    assert text.add("", final=True) == ("me", False)  # the end releases what was held


@pytest.fixture
def gpt2_model():
    torch.manual_seed(0)
    return GPT(GPT2_CFG).eval()


def boundary_stop(tok, ids: list[int]) -> tuple[str, int]:
    """A stop string made of the end of one id's text and the start of the next, whose first occurrence in
    the text is that one; and how many ids it takes to complete it."""
    text = ""
    for n in range(1, len(ids)):
        left, right = tok.decode(ids[n - 1:n]), tok.decode(ids[n:n + 1])
        text += left
        if left.isascii() and right.isascii() and len(left.strip()) > 1 and len(right.strip()) > 1:
            stop = left[-2:] + right[:2]
            if (text + right).find(stop) == len(text) - 2:
                return stop, n + 1
    raise AssertionError("no id boundary to split a stop string across")


def test_a_stop_string_split_across_two_ids_ends_only_its_row_and_is_left_out(gpt2_model):
    tok = get_tokenizer()
    prompts = [tok.encode("Once upon a time"), tok.encode("The dog")]
    settings = SamplingSettings(temperature=0, max_new_tokens=20)
    full = complete(gpt2_model, tok, prompts, settings)
    ids = [i.item() for i in torch.stack(list(decode(gpt2_model, prompts, settings)), dim=1)[0]]
    stop, needed = boundary_stop(tok, ids)
    assert stop not in full[1].text
    stopped = complete(gpt2_model, tok, prompts, SamplingSettings(temperature=0, max_new_tokens=20, stop=(stop,)))
    assert stopped[0].text == full[0].text[:full[0].text.find(stop)]
    assert (stopped[0].finish_reason, stopped[0].tokens) == ("stop", needed)
    assert stopped[1] == full[1] and full[1].finish_reason == "length" and full[1].tokens == 20


def test_end_of_text_finishes_a_row_with_stop_and_is_not_part_of_its_text(gpt2_model):
    direction = torch.ones(GPT2_CFG.n_embd)
    with torch.no_grad():  # every final hidden state becomes `direction`, and EOT is the id most aligned with it
        gpt2_model.transformer.ln_f.weight.zero_()
        gpt2_model.transformer.ln_f.bias.copy_(direction)
        gpt2_model.transformer.wte.weight[EOT_ID] = 10 * direction
    deltas = list(stream(gpt2_model, get_tokenizer(), [[1, 2, 3], [4]], SamplingSettings(max_new_tokens=5)))
    assert sorted((d.row, d.text, d.tokens, d.finish_reason) for d in deltas) == [(0, "", 1, "stop"),
                                                                                   (1, "", 1, "stop")]


def test_each_row_ends_with_exactly_one_finishing_delta(gpt2_model):
    tok = get_tokenizer()
    deltas = list(stream(gpt2_model, tok, [tok.encode("Hello"), tok.encode("A long time ago")],
                         SamplingSettings(max_new_tokens=7), torch.Generator().manual_seed(0)))
    for row in (0, 1):
        mine = [d for d in deltas if d.row == row]
        assert [d.finish_reason for d in mine] == [None] * (len(mine) - 1) + ["length"]
        assert mine[-1].tokens == 7 and all(d.text for d in mine[:-1])


def test_the_same_seed_gives_the_same_texts_for_a_batch(gpt2_model):
    tok = get_tokenizer()
    prompts = [tok.encode("Once upon a time"), [EOT_ID], tok.encode("Tom and his dog went")]
    settings = SamplingSettings(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.3, max_new_tokens=10)

    def texts(seed: int) -> list[str]:
        return [c.text for c in complete(gpt2_model, tok, prompts, settings, torch.Generator().manual_seed(seed))]

    first = texts(3)
    assert texts(3) == first and texts(4) != first


def test_stop_on_the_command_line_ends_the_text_before_it(tiny_run, capsys):
    argv = ["generate", str(tiny_run), "--prompt", "Tom had", "--max-new-tokens", "20", "--temperature", "0"]
    assert main(argv) == 0
    generated = capsys.readouterr().out.removeprefix("Tom had")
    stop = generated[4:7]
    assert main(argv + ["--stop", "no such text", "--stop", stop]) == 0
    assert capsys.readouterr().out == "Tom had" + generated[:generated.find(stop)]


def test_draw_follows_the_probabilities_and_never_picks_an_id_of_probability_zero():
    g = torch.Generator().manual_seed(0)
    ids = draw(torch.tensor([[0.0, 0.1, 0.0, 0.2, 0.3, 0.4, 0.0]]).expand(20_000, 7), g)
    share = torch.bincount(ids, minlength=7) / 20_000
    assert share[[0, 2, 6]].tolist() == [0, 0, 0]
    torch.testing.assert_close(share[[1, 3, 4, 5]], torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.015, rtol=0)
    assert draw(torch.tensor([[0.0, 0.0, 1.0]]).expand(1000, 3), g).unique().tolist() == [2]


COMPACT_SETTINGS = [SamplingSettings(temperature=1.0), SamplingSettings(temperature=0.6),
                    SamplingSettings(temperature=1.7), SamplingSettings(temperature=1.0, top_k=4),
                    SamplingSettings(temperature=0.8, top_k=30), SamplingSettings(temperature=1.0, top_k=6, top_p=0.7),
                    SamplingSettings(temperature=1.0, top_p=0.5), SamplingSettings(temperature=0.7, top_p=0.95)]


@pytest.mark.parametrize("settings", COMPACT_SETTINGS, ids=lambda s: f"t{s.temperature}-k{s.top_k}-p{s.top_p}")
def test_a_compact_head_samples_the_class_then_the_id_with_the_expanded_distribution(compact, settings):
    model, _ = compact
    hidden = torch.randn(1, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 40
    with torch.no_grad():  # the likeliest rare ids (q about 1/91 each) about as likely as the best class
        best = model.lm_head.class_logits(hidden)[0, :10].max()
        model.lm_head.other.copy_(hidden * (best + 4) / hidden.square().sum())
        logits = model.lm_head(hidden)[0]  # (101,): the expanded logits
        expected = sample_probabilities(logits, settings)
        sampler = make_picker(model, settings, torch.Generator().manual_seed(6), seen=None)
        assert isinstance(sampler, CompactSampler)
        ids = sampler(hidden.expand(100_000, -1))
    share = torch.bincount(ids, minlength=101).double() / ids.numel()
    assert (share[expected == 0] == 0).all()  # never an id the filters removed
    assert share[model.lm_head.class_of == 10].sum() > 0.02  # rare ids are drawn, through "other"
    torch.testing.assert_close(share, expected, atol=0.008, rtol=0)


@pytest.mark.parametrize("settings", [SamplingSettings(top_p=0.9), SamplingSettings(temperature=0.8, top_p=0.6)],
                         ids=["p0.9", "t0.8-p0.6"])
def test_a_compact_nucleus_is_exact_without_the_expanded_logits_where_q_is_peaked(monkeypatch, settings):
    counts = torch.ones(101, dtype=torch.long)
    counts[:10], counts[10:13] = 10_000, torch.tensor([3000, 2000, 1000])  # three rare ids hold most of q
    model = compact_model(counts)
    hidden = torch.randn(1, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 40
    with torch.no_grad():  # "other" about as likely as the best class
        best = model.lm_head.class_logits(hidden)[0, :10].max()
        model.lm_head.other.copy_(hidden * best / hidden.square().sum())
        expected = sample_probabilities(model.lm_head(hidden)[0], settings)
        monkeypatch.setattr(model.lm_head, "forward", None)  # the expanded logits are not needed
        ids = make_picker(model, settings, torch.Generator().manual_seed(6), seen=None)(hidden.expand(100_000, -1))
    share = torch.bincount(ids, minlength=101).double() / ids.numel()
    assert expected[10:13].sum() > 0.1 and (share[expected == 0] == 0).all()
    torch.testing.assert_close(share, expected, atol=0.008, rtol=0)


def sample_probabilities(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """The distribution sample_next draws from, over the expanded logits."""
    logits = logits[None] / settings.temperature
    if settings.top_k is not None:
        logits = top_k_filter(logits, settings.top_k)
    return top_p_filter(logits, settings.top_p).softmax(-1)[0]


def test_a_compact_heads_greedy_pick_is_the_argmax_of_the_expanded_logits(compact):
    model, _ = compact
    hidden = torch.randn(2000, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) * 10
    with torch.no_grad():
        model.lm_head.other.normal_(0, 0.3, generator=torch.Generator().manual_seed(9))  # "other" sometimes wins
        picked = make_picker(model, SamplingSettings(temperature=0), None, seen=None)(hidden)
        expected = model.lm_head(hidden).argmax(-1)
    assert torch.equal(picked, expected)
    rare = model.lm_head.class_of[expected] == 10
    assert 0 < rare.sum() < len(rare)  # both kinds of winner were checked


def test_the_repetition_penalty_goes_through_the_expanded_logits(compact):
    model, _ = compact
    seen = torch.zeros(1, 101, dtype=torch.bool)
    assert not isinstance(make_picker(model, SamplingSettings(repetition_penalty=1.3), None, seen), CompactSampler)


@pytest.mark.parametrize("scale, other_logit, expanded", [(60, 0.0, False), (0.1, 5.0, True)],
                         ids=["peaked", "mostly-rare"])
def test_a_compact_nucleus_needs_the_expanded_logits_only_where_it_reaches_the_rare_ids_left_out(
        compact, monkeypatch, scale, other_logit, expanded):
    model, _ = compact
    hidden = torch.randn(1, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * scale
    with torch.no_grad():  # "other" with 91 rare ids: the 10 likeliest cannot hold 0.9 of the mass it gets
        model.lm_head.other.copy_(hidden * other_logit / hidden.square().sum())
    settings = SamplingSettings(top_p=0.9)
    calls = []
    monkeypatch.setattr(model.lm_head, "forward", lambda x: calls.append(x) or torch.zeros(x.size(0), 101,
                                                                                          dtype=x.dtype))
    with torch.no_grad():
        make_picker(model, settings, torch.Generator().manual_seed(6), seen=None)(hidden.expand(50, -1))
    assert bool(calls) is expanded


# bfloat16 keeps 8 significant bits: each rounding is within 2^-8 of the value, and a logit is the sum of
# many rounded products, so greedy decoding may pick another id only where the top two are closer than this.
BF16_LOGIT_TOLERANCE = 0.1


def test_bfloat16_greedy_text_equals_float32_except_where_the_top_two_logits_are_within_rounding(trained):
    full, _, _ = load_model(checkpoint_dir(trained), "cpu", torch.float32)
    half, _, _ = load_model(checkpoint_dir(trained), "cpu", torch.bfloat16)
    assert half.transformer.wte.weight.dtype == torch.bfloat16
    prompt = [get_tokenizer().encode("Lily had a")]
    settings = SamplingSettings(temperature=0, max_new_tokens=24)
    ours, theirs = (torch.stack(list(decode(m, prompt, settings)), dim=1)[0] for m in (full, half))
    context = torch.tensor([prompt[0] + ours.tolist()])
    with torch.no_grad():
        logits_32 = full(context)[0][0, len(prompt[0]) - 1:-1]  # (24, V): the logits each new id came from
        logits_16 = half(context)[0][0, len(prompt[0]) - 1:-1].float()
    torch.testing.assert_close(logits_16, logits_32, atol=BF16_LOGIT_TOLERANCE, rtol=0.02)
    differ = (ours != theirs).nonzero()
    if len(differ):  # after the first difference the contexts differ: only that step can be judged
        step = differ[0, 0]
        gap = logits_32[step, ours[step]] - logits_32[step, theirs[step]]
        assert 0 <= gap <= BF16_LOGIT_TOLERANCE, (step, gap)


def test_generate_and_eval_accept_dtype_bfloat16(tiny_run, tiny_data, capsys):
    assert main(["generate", str(tiny_run), "--prompt", "Tom", "--temperature", "0", "--max-new-tokens", "8",
                 "--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.startswith("Tom")
    losses = {}
    for dtype in ("float32", "bfloat16"):
        assert main(["eval", str(tiny_run), "--data", str(tiny_data), "--device", "cpu", "--dtype", dtype,
                     "--json"]) == 0
        losses[dtype] = json.loads(capsys.readouterr().out)["loss"]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.02)


def test_word_forms_are_the_first_ids_of_each_written_form_by_where_it_fits():
    from slm.data.tokenizer import get_tokenizer
    from slm.inference.logit_bias import word_forms

    tok = get_tokenizer()
    [ball, lily, roxy] = word_forms(tok, ["ball", "Lily", "Roxy"])
    assert (ball.mid, ball.start, ball.bare) == ({tok.encode(" ball")[0]}, {tok.encode(" Ball")[0]},
                                                 {tok.encode("Ball")[0]})
    assert lily.mid == lily.start == {tok.encode(" Lily")[0]} and tok.encode(" lily")[0] not in lily.mid
    assert roxy.mid == {tok.encode(" Roxy")[0]} and roxy.rest[tok.encode(" Roxy")[0]] == tuple(tok.encode(" Roxy")[1:])
    for forms in word_forms(tok, ["strawberries", "umbrella"]):
        assert all(len(tok.decode([i]).strip()) >= 3 for i in forms.mid | forms.start | forms.bare)  # never " st"


def biased_ids(text: str, words: list[str], strength: float = 8.0) -> set[str]:
    """The pieces a word bias pushes after `text` was written by the row."""
    from slm.inference.logit_bias import LogitBias, word_forms

    tok = get_tokenizer()
    settings = SamplingSettings(word_bias=strength)
    bias = LogitBias([word_forms(tok, words)], settings, 50257, torch.device("cpu"), [tok.encode(text)])
    return {tok.decode([i]) for i in torch.nonzero(bias.bias[0] > 0).flatten().tolist()}


@pytest.mark.parametrize("text, pushed", [
    ("Tom was sad. She heard a", {" together", " sun"}),  # mid-sentence: never "Together" glued onto "a"
    ("Tom was sad. You are a great", {" together", " sun"}),
    ("Tom was sad. They went home.", {" Together", " Sun"}),  # a sentence's first word
    ('Tom was sad. He said, "', {"Together", "Sun"}),  # after an opening quote, no space
    ("Tom was sad.\n", {"Together", "Sun"}),  # after a newline
])
def test_a_word_bias_pushes_only_forms_that_cannot_glue_onto_the_word_before(text, pushed):
    assert biased_ids(text, ["together", "sun"]) == pushed


def test_a_word_bias_pushes_names_at_once_other_words_after_the_first_sentence_and_finishes_a_name():
    tok = get_tokenizer()
    assert biased_ids("Once upon a time", ["ball", "Roxy"]) == {tok.decode(tok.encode(" Roxy")[:1])}
    assert biased_ids("Once upon a time there was", ["ball", "Roxy"]) >= {tok.decode(tok.encode(" Roxy")[:1])}
    assert " ball" not in biased_ids("Once upon a time there was a", ["ball"])  # the first sentence goes free
    assert " ball" in biased_ids("Lily woke up. She saw a", ["ball"])
    begun = "Lily woke up. She met" + tok.decode(tok.encode(" Roxy")[:1])
    assert biased_ids(begun, ["Roxy"]) == {tok.decode(tok.encode(" Roxy")[1:2])}  # the rest of the name
    assert biased_ids("Lily woke up. She met Roxy and a", ["Roxy", "ball"]) == {" ball"}  # written: no more bias


def test_word_reach_pushes_a_word_only_where_it_is_near_the_best_and_widens_with_each_sentence():
    from slm.inference.logit_bias import FORCE, LogitBias, word_forms

    tok = get_tokenizer()
    ball, cat = tok.encode(" ball")[0], tok.encode(" cat")[0]
    settings = SamplingSettings(word_bias=8.0, word_reach=2.0)

    def pushed(text: str, ball_logit: float) -> float:
        push = LogitBias([word_forms(tok, ["ball"])], settings, 50257, torch.device("cpu"), [tok.encode(text)])
        logits = torch.zeros(1, 50257)
        logits[0, cat], logits[0, ball] = 10.0, ball_logit
        return (push.apply(logits) - logits)[0, ball].item()

    one_sentence = "Lily woke up. She saw a"
    assert pushed(one_sentence, 8.5) == 8.0  # within 2 of the best: pushed
    assert pushed(one_sentence, 7.0) == 0.0  # 3 below the best: left to the model
    assert pushed("Lily woke up. She ran. She saw a", 7.0) == 8.0  # two sentences ended: reach 4
    assert pushed("Lily woke up. She ran. She saw a", 5.0) == 0.0
    everywhere = LogitBias([word_forms(tok, ["ball"])], SamplingSettings(word_bias=8.0), 50257, torch.device("cpu"),
                           [tok.encode(one_sentence)])
    assert (everywhere.apply(torch.zeros(1, 50257)) - everywhere.bias).abs().max() == 0  # no reach: always
    roxy = tok.encode(" Roxy")
    finishing = LogitBias([word_forms(tok, ["Roxy"])], settings, 50257, torch.device("cpu"),
                          [tok.encode("Lily met") + roxy[:1]])
    far = torch.zeros(1, 50257)
    far[0, cat] = 50.0
    assert (finishing.apply(far) - far)[0, roxy[1]].item() == FORCE  # a name begun is finished
    name = LogitBias([word_forms(tok, ["Roxy"])], settings, 50257, torch.device("cpu"), [tok.encode("Once upon a")])
    assert (name.apply(far) - far)[0, roxy[0]].item() == 8.0  # a name is pushed however far: any name fits


def test_a_word_is_pushed_only_where_it_fits_nearly_as_well_as_anywhere_it_was_due_before():
    from slm.inference.logit_bias import LogitBias, word_forms

    tok = get_tokenizer()
    ball, cat = tok.encode(" ball")[0], tok.encode(" cat")[0]
    push = LogitBias([word_forms(tok, ["ball"])], SamplingSettings(word_bias=8.0, word_reach=2.0), 50257,
                     torch.device("cpu"), [tok.encode("Lily woke up. She ran. She hid. She saw a")])  # reach 6

    def pushed(ball_logit: float) -> float:
        logits = torch.zeros(1, 50257)
        logits[0, cat], logits[0, ball] = 10.0, ball_logit
        return (push.apply(logits) - logits)[0, ball].item()

    assert pushed(6.0) == 8.0  # 4 below the best id, within the reach: pushed (the model writes a cat here)
    assert pushed(3.5) == 0.0  # a worse fit than that spot by more than the word reach (2): not here
    assert pushed(4.5) == 8.0  # nearly as good as the best spot so far: pushed
    assert pushed(7.0) == 8.0  # a better spot than any before


def test_a_name_written_whole_is_never_lengthened_wherever_the_row_writes_it():
    from slm.inference.logit_bias import FORCE, LogitBias, word_forms

    tok = get_tokenizer()
    y, s, comma = tok.encode("y")[0], tok.encode("'s")[0], tok.encode(",")[0]
    for text in ("Once upon a time there was Toot", "Toot woke up. Toot"):  # pushed, then the model's own
        bias = LogitBias([word_forms(tok, ["Toot"])], SamplingSettings(word_bias=8.0), 50257, torch.device("cpu"),
                         [tok.encode(text)]).bias[0]
        assert bias[y] == -FORCE and bias[s] == 0 and bias[comma] == 0  # "Toot's", "Toot," read fine
    mid = LogitBias([word_forms(tok, ["Toot"])], SamplingSettings(word_bias=8.0), 50257, torch.device("cpu"),
                    [tok.encode("Once upon a time there was a")]).bias[0]
    assert mid[y] == 0


def test_a_requested_length_holds_back_or_pushes_end_of_text_by_the_words_written():
    from slm.data.requests import word_count
    from slm.inference.logit_bias import FORCE, Length, LogitBias

    tok = get_tokenizer()
    eot = tok.eot_id

    def eot_bias(text: str, length: Length) -> float:
        row = LogitBias([[]], SamplingSettings(), 50257, torch.device("cpu"), [tok.encode(text)], [length])
        assert row.word_count[0] == word_count(text)  # words counted as the checker counts them
        return row.bias[0, eot].item()

    story = 'Tom had a dog.\n"Let\'s play!" said Tom. They ran to the park, and it was sunny'  # 16 words
    assert eot_bias(story + ".", Length(least=20)) == -FORCE  # too short to end
    assert eot_bias(story + ".", Length(least=16)) == 0
    assert eot_bias(story, Length(most=20)) == 0  # mid-sentence: never cut off
    assert 0 < eot_bias(story + ".", Length(most=20)) < eot_bias(story + " and hot.", Length(most=20))
    assert eot_bias(story + ".", Length(most=40)) == 0  # not yet half the limit
    assert eot_bias(story + ".", Length(most=16)) == FORCE  # at the limit: the next sentence end ends it


def test_end_of_text_is_pushed_at_sentence_ends_as_the_token_budget_runs_out():
    from slm.inference.logit_bias import FORCE, Length, LogitBias

    tok = get_tokenizer()
    sentence, clause = tok.encode(" Tom ran."), tok.encode(" Tom ran")
    settings = dataclasses.replace(SamplingSettings(), max_new_tokens=200)

    def eot_bias_after(ids: list[int]) -> float:
        row = LogitBias([[]], settings, 50257, torch.device("cpu"), None, [Length()])
        for next_id in ids:
            row.written([next_id])
        return row.bias[0, tok.eot_id].item()

    early, late = sentence * 40, sentence * 55  # 120 and 165 of 200 ids: 80 and 35 left
    assert eot_bias_after(early) == 0 < eot_bias_after(sentence * 52) < eot_bias_after(late) < FORCE
    assert eot_bias_after(sentence * 62) == FORCE  # 14 left: the sentence end ends the answer
    assert eot_bias_after(sentence * 61 + clause) == 0  # mid-sentence: never cut off


def test_dry_penalizes_the_id_that_would_extend_a_repeat_more_the_longer_the_repeat():
    from slm.inference.logit_bias import LogitBias

    settings = SamplingSettings(dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2)
    history = [5, 6, 7, 8, 9, 1, 2, 5, 6, 7]  # "5 6 7" came before, followed by 8
    bias = LogitBias([[]], settings, 50257, torch.device("cpu"), [history]).bias[0]
    assert bias[8].item() == pytest.approx(-0.8 * 1.75 ** (3 - 2))
    assert (bias < 0).sum().item() == 1  # only the id that would go on repeating
    short = LogitBias([[]], settings, 50257, torch.device("cpu"), [[5, 6, 1, 5]]).bias[0]
    assert (short < 0).sum().item() == 0  # a repeat of one id is allowed
    newline = get_tokenizer().encode("\n")[0]  # a breaker: the match does not cross it
    broken = LogitBias([[]], settings, 50257, torch.device("cpu"), [[newline, 6, 7, 1, newline, 6, 7]]).bias[0]
    assert broken[1].item() == pytest.approx(-0.8 * 1.75 ** (2 - 2))


def test_greedy_decoding_with_dry_repeats_less():
    def longest_repeat(ids: list[int]) -> int:  # the longest run of ids that comes twice
        return max((n for n in range(1, len(ids)) for i in range(len(ids) - n)
                    if any(ids[i:i + n] == ids[j:j + n] for j in range(i + 1, len(ids) - n + 1))), default=0)

    lively, settings = lively_model(), dataclasses.replace(GREEDY, max_new_tokens=20)
    plain = torch.stack(list(decode(lively, [[1, 2, 3]], settings)), dim=1)[0].tolist()
    dry = torch.stack(list(decode(lively, [[1, 2, 3]], dataclasses.replace(settings, dry_multiplier=5.0))),
                      dim=1)[0].tolist()
    assert longest_repeat(plain) > 2 and longest_repeat(dry) <= 2  # DRY allows repeats of dry_allowed_length


def name(first_id: int):
    """A requested name whose every form starts with this id."""
    from slm.inference.logit_bias import WordForms

    return WordForms(str(first_id), True, frozenset({first_id}), frozenset({first_id}), frozenset({first_id}), {})


def test_a_word_bias_reaches_any_id_of_a_compact_head_even_one_never_seen_in_training(compact):
    model, _ = compact  # ids 7 and 42 were never seen in training: the rarest ids of the head
    settings = SamplingSettings(temperature=0, max_new_tokens=3, word_bias=100.0)
    rows = list(decode(model, [[1, 2], [3]], settings, words=[[name(7)], [name(42), name(5)]]))
    ids = torch.stack(rows, dim=1).tolist()
    assert ids[0][0] == 7 and 7 not in ids[0][1:]  # written once, then the bias is gone
    assert sorted(ids[1][:2]) == [5, 42]
