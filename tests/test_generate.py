import pytest
import torch

from slm.checkpoint import checkpoint_dir, load_model
from slm.cli import main
from slm.config import ModelConfig
from slm.errors import SlmError
from slm.generate import KVCache, check_sampling, generate, prompt_ids, sample_next
from slm.model import GPT
from slm.tokenizer import get_tokenizer

CFG = ModelConfig(vocab_size=101, block_size=24, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(CFG).eval()


def test_greedy_decoding_with_the_cache_equals_full_recompute(model):
    prompt = torch.randint(0, 101, (3, 5), generator=torch.Generator().manual_seed(1))
    slow = generate(model, prompt, 15, temperature=0, use_cache=False)
    fast = generate(model, prompt, 15, temperature=0, use_cache=True)
    assert torch.equal(slow, fast)


def test_cached_logits_match_full_forward_within_1e_5(model):
    ids = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(2))
    full, _ = model(ids)
    cache = KVCache(model, 2, torch.device("cpu"), torch.float32)
    prefill, _ = model(ids[:, :8], kv_cache=cache)
    cache.advance(8)
    steps = [prefill]
    for t in range(8, 20):
        logits, _ = model(ids[:, t:t + 1], kv_cache=cache)
        cache.advance(1)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_generation_past_the_context_window_slides_and_keeps_going(model):
    out = generate(model, torch.zeros(1, 3, dtype=torch.long), 3 * CFG.block_size, temperature=0)
    assert out.shape == (1, 3 + 3 * CFG.block_size)


def test_top_k_keeps_exactly_k_ids_even_when_logits_tie():
    logits = torch.zeros(1, 50)  # every id ties
    g = torch.Generator().manual_seed(0)
    seen = {sample_next(logits, 1.0, top_k=3, generator=g).item() for _ in range(300)}
    assert len(seen) == 3


def test_top_k_never_samples_outside_the_k_most_likely_ids():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    allowed = logits.topk(5, dim=-1).indices
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        ids = sample_next(logits, 2.0, top_k=5, generator=g)
        assert all(ids[b] in allowed[b] for b in range(4))


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, 0.0, 0.0]])
    assert sample_next(logits, 0.0).tolist() == [1, 0]


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
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-k", "0"], "--top-k must be between 1 and 50257"),
    (["--top-k", "50258"], "--top-k must be between 1 and 50257"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be between"),
    (["--num-samples", "0"], "--num-samples must be at least 1"),
])
def test_bad_sampling_settings_are_one_line_errors(tiny_run, capsys, argv, message):
    assert main(["generate", str(tiny_run)] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("slm: error: ") and message in err and err.count("\n") == 1


def test_a_prompt_longer_than_the_context_keeps_its_end_with_a_warning(capsys):
    tok = get_tokenizer()
    ids = prompt_ids(tok, "one two three four five six seven eight", block_size=4)
    assert ids == tok.encode(" six seven eight")
    assert "keeping its last 3" in capsys.readouterr().err


def test_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_check_sampling_accepts_valid_settings():
    check_sampling(0.0, None, 1, 50257)
    check_sampling(1.5, 50257, 100, 50257)
    with pytest.raises(SlmError):
        check_sampling(1.0, 10, 100_001, 50257)
