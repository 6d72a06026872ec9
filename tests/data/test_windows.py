import numpy as np
import pytest
import torch

from conftest import CONVERSATIONS, write_prepared
from slm.config import resolve
from slm.data.template import render
from slm.data.windows import (ConditionedRows, PretrainBatches, SftBatches, ShuffledWindows, check_fits,
                              document_bounds, get_batch, masked_windows, open_split, pack, token_counts,
                              validation_starts, window_starts)
from slm.device import World
from slm.errors import SlmError
from slm.model.gpt import IGNORE_INDEX


def test_memmap_round_trip_and_targets_are_inputs_shifted_by_one(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) * 7
    write_prepared(tmp_path, tokens, tokens[:100])
    train = open_split(tmp_path, "train")
    assert isinstance(train, np.memmap) and np.array_equal(train, tokens)
    starts = np.array([0, 5, 900])
    x, y = get_batch(train, starts, 16, torch.device("cpu"))
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.int64
    for row, s in enumerate(starts):
        assert x[row].tolist() == tokens[s:s + 16].tolist()
        assert y[row].tolist() == tokens[s + 1:s + 17].tolist()


def test_window_order_depends_only_on_seed_and_step():
    a = window_starts(seed=1, step=7, count=32, n_tokens=10_000, block_size=64)
    assert np.array_equal(a, window_starts(1, 7, 32, 10_000, 64))
    assert not np.array_equal(a, window_starts(1, 8, 32, 10_000, 64))
    assert not np.array_equal(a, window_starts(2, 7, 32, 10_000, 64))
    assert a.min() >= 0 and a.max() <= 10_000 - 64 - 1


def test_validation_windows_are_fixed_and_differ_from_training_windows():
    v = validation_starts(3, 16, 5000, 32)
    assert np.array_equal(v, validation_starts(3, 16, 5000, 32))
    assert not np.array_equal(v, window_starts(3, 0, 16, 5000, 32))


def test_every_window_fits_even_at_the_end_of_the_data():
    starts = window_starts(0, 0, 10_000, n_tokens=40, block_size=32)
    assert starts.max() + 32 + 1 <= 40


def test_shuffled_windows_visit_every_window_of_a_pass_once_then_start_a_new_pass():
    windows = ShuffledWindows(seed=5, n_tokens=10_000, block_size=64)
    assert windows.windows == 155  # (10,000 - 1) // 64 - 1: they fit at every offset below 64
    first_pass = np.concatenate([windows(step, 31) for step in range(5)])  # 155 = 5 x 31
    offset = first_pass.min() % 64
    assert sorted(first_pass) == [offset + 64 * i for i in range(155)]
    assert not np.array_equal(first_pass, offset + 64 * np.arange(155))  # in a random order
    second_pass = np.concatenate([windows(step, 31) for step in range(5, 10)])
    assert len(set(second_pass)) == 155 and (second_pass + 64 + 1 <= 10_000).all()
    assert not np.array_equal(np.sort(first_pass), np.sort(second_pass))  # at another offset, mostly
    # a batch that straddles two passes, the same whoever asks, in whatever order
    straddling = ShuffledWindows(5, 10_000, 64)(3, 40)  # windows 120..159: 35 of pass 0, 5 of pass 1
    assert np.array_equal(straddling, np.concatenate([first_pass, second_pass])[120:160])
    assert not np.array_equal(straddling, ShuffledWindows(6, 10_000, 64)(3, 40))


@pytest.mark.parametrize("windows", ["random", "shuffled"])
def test_training_batches_take_the_windows_that_windows_names(tmp_path, windows):
    from slm.config import resolve

    tokens = np.arange(3000) % 50_000
    write_prepared(tmp_path, tokens, tokens[:300])
    cfg = resolve("tiny", flags={"train": {"data": str(tmp_path), "windows": windows, "batch_size": 8,
                                           "micro_batch_size": 4}})
    batches = PretrainBatches(str(tmp_path), cfg, torch.device("cpu"))
    T = cfg.model.block_size
    starts = (ShuffledWindows(cfg.train.seed, 3000, T) if windows == "shuffled" else
              lambda step, count: window_starts(cfg.train.seed, step, count, 3000, T))(2, 8)
    x = torch.cat([inputs for inputs, _ in batches(2)])
    assert x[:, 0].tolist() == starts.tolist()  # token i is i here


def test_shuffled_windows_fit_in_data_barely_longer_than_a_window():
    windows = ShuffledWindows(seed=0, n_tokens=40, block_size=32)
    starts = np.concatenate([windows(step, 3) for step in range(50)])
    assert starts.min() >= 0 and starts.max() + 32 + 1 <= 40 and len(set(starts)) > 1


def test_data_shorter_than_a_window_is_a_clear_error(tmp_path):
    write_prepared(tmp_path, np.arange(20), np.arange(20))
    with pytest.raises(SlmError, match="lower --block-size"):
        check_fits(open_split(tmp_path, "train"), 32, "train")


def test_token_counts_are_counted_in_chunks_and_match_bincount(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50, 1000).astype(np.uint16)
    write_prepared(tmp_path, tokens, tokens[:100])
    counts = token_counts(open_split(tmp_path, "train"), vocab_size=60, chunk=7)
    assert np.array_equal(counts, np.bincount(tokens, minlength=60))


def test_conditioned_rows_are_a_request_then_its_story_from_the_start_with_the_loss_on_the_story(tmp_path):
    from slm.assistant.constraints import check
    from slm.data.stories import demo_documents
    from slm.data.template import MARKERS
    from slm.data.tokenizer import EOT_ID, get_tokenizer
    from slm.model.gpt import IGNORE_INDEX

    tok = get_tokenizer()
    stories = [s for _, s in zip(range(60), demo_documents("train"))]
    ids = np.array([i for s in stories for i in tok.encode(s) + [EOT_ID]], dtype=np.uint16)
    write_prepared(tmp_path, ids, ids[:500])
    tokens = open_split(tmp_path, "train")
    starts, ends = document_bounds(tokens, EOT_ID, chunk=1000)  # chunked: documents cross chunk edges
    assert len(starts) == 60 and [tok.decode(tokens[a:b].tolist()) for a, b in zip(starts, ends)] == stories

    rows = ConditionedRows(tokens, 128, seed=3, share=1.0)
    made = [rows.row(step=7, index=index) for index in range(40)]
    assert sum(m is not None for m in made) >= 36  # None: no short enough request in 8 draws, a plain row then
    for row, learn, constraints in filter(None, made):
        assert len(row) == len(learn) == 129 and constraints
        request = tok.decode(row[~learn].tolist())
        assert request.startswith(MARKERS["user"]) and request.endswith(MARKERS["assistant"])
        answer = tok.decode(row[learn].tolist())
        assert any(answer.startswith(story[:50]) for story in stories)  # a story from its start
        # what the request asks that a row can show is in the row: the words, the character, the first sentence
        shown = {key: constraints[key] for key in ("words", "name", "starts") if key in constraints}
        assert all(score == 1.0 for score in check(shown, answer).values()), (request, answer)
    again, _, _ = ConditionedRows(tokens, 128, seed=3, share=1.0).row(step=7, index=5)
    assert np.array_equal(again, rows.row(step=7, index=5)[0])  # a pure function of (seed, step, row)

    x, y = rows.batch(np.array([0, 10, 20, 30]), step=2, rows=[0, 1, 2, 3], device=torch.device("cpu"))
    assert x.shape == y.shape == (4, 128) and (y == IGNORE_INDEX).any(dim=1).all()
    plain = ConditionedRows(tokens, 128, seed=3, share=0.0)
    x, y = plain.batch(np.array([0, 10]), step=2, rows=[0, 1], device=torch.device("cpu"))
    assert (y != IGNORE_INDEX).all() and x[1].tolist() == tokens[10:138].tolist()


def test_sft_targets_are_ignore_index_wherever_the_target_is_not_an_assistant_token():
    data = pack(CONVERSATIONS * 3, block_size=16)
    x, y = masked_windows(data, data.starts, 16)
    offsets = data.starts[:, None] + np.arange(17)
    ids, learn = np.take(data.ids, offsets, mode="wrap"), np.take(data.mask, offsets, mode="wrap")
    assert np.array_equal(x, ids[:, :-1])
    assert np.array_equal(y[learn[:, 1:]], ids[:, 1:][learn[:, 1:]])
    assert (y[~learn[:, 1:]] == IGNORE_INDEX).all()
    assert ((y != IGNORE_INDEX).sum(axis=1) > 0).all()  # no window without a token to learn: no NaN loss


def test_a_conversation_longer_than_the_context_is_tiled_so_each_assistant_token_is_a_target_once():
    long = [{"role": "user", "content": "Tell me a long story. " * 10},
            {"role": "assistant", "content": "One day a dog ran. " * 12}]
    data = pack([long], block_size=8)
    ids, mask = render(long)
    predicted = np.concatenate([s + 1 + np.arange(8) for s in data.starts])
    predicted = predicted[predicted < len(ids)]
    assert sorted(predicted[np.array(mask)[predicted]]) == [i for i, m in enumerate(mask) if m]
    assert len(set(predicted)) == len(predicted)


def test_sft_batches_are_a_function_of_seed_and_step():
    cfg = resolve("tiny")
    batches = SftBatches(pack(CONVERSATIONS * 5, cfg.model.block_size), cfg, torch.device("cpu"))
    first, again, other = batches(3), batches(3), batches(4)
    assert all(torch.equal(a, b) for pair in zip(first, again) for a, b in zip(*pair))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    assert sum(x.size(0) for x, _ in first) == cfg.train.batch_size


def test_each_process_takes_its_own_slice_of_the_sft_global_batch():
    cfg = resolve("tiny", flags={"train": {"batch_size": 8, "micro_batch_size": 2}})
    data = pack(CONVERSATIONS * 5, cfg.model.block_size)
    whole = SftBatches(data, cfg, torch.device("cpu"))(3)
    halves = [SftBatches(data, cfg, torch.device("cpu"), World(rank, rank, 2))(3) for rank in (0, 1)]
    assert [len(half) for half in halves] == [2, 2]  # 8 rows = 2 processes x 2 micro-batches of 2
    for (x, y), (wx, wy) in zip(halves[0] + halves[1], whole):
        assert torch.equal(x, wx) and torch.equal(y, wy)
