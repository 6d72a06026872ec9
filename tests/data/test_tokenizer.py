"""slm's tokenizer is exactly GPT-2's: checked against tiktoken's `gpt2` and Hugging Face's GPT2TokenizerFast."""

import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slm.data.tokenizer import EOT_ID, StopText, StreamDecoder, get_tokenizer, vocab_files

TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "naïve café — «quotes» „und so“ ‘curly’ “double”",
    "emoji 🙂👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷",
    "中文字符 日本語のテキスト 한국어 텍스트",
    "Ελληνικά, русский, עברית, العربية, हिन्दी",
    "runs   of    spaces\t\ttabs\n\n\nnewlines \r\n crlf   ",
    "   leading and trailing   ",
    "numbers 123 4567 3.14159 1,000,000 0x1F 2024-01-01",
    "contractions: I'm you're he's we'll they've can't won't I'd 'S 'LL",
    "a literal <|endoftext|> in the middle, and <|endoftext|>at the end<|endoftext|>",
    "code: def f(x):\n    return x**2  # comment\n",
    "\u200bzero\u200dwidth\ufeffbom \x00 nul \x7f del",
    "",
]


@pytest.fixture(scope="session")
def hf_gpt2(tmp_path_factory):
    """Hugging Face's GPT-2 tokenizer from the same files. Loaded from a folder because transformers 5
    silently ignores GPT2TokenizerFast(vocab_file=..., merges_file=...) and builds an empty vocabulary."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf-gpt2")
    vocab_bpe, encoder_json = vocab_files()
    shutil.copy(encoder_json, folder / "vocab.json")
    shutil.copy(vocab_bpe, folder / "merges.txt")
    return transformers.GPT2TokenizerFast.from_pretrained(folder)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_tiktoken_gpt2(text, reference_gpt2):
    assert get_tokenizer().encode(text) == reference_gpt2.encode_ordinary(text)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_hugging_face_gpt2(text, hf_gpt2):
    # HF treats "<|endoftext|>" in text as the special token unless told to split it as ordinary text.
    assert get_tokenizer().encode(text) == hf_gpt2.encode(text, split_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_inverts_encode(text):
    tokenizer = get_tokenizer()
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_literal_endoftext_is_text_and_eot_is_the_last_id(reference_gpt2):
    tokenizer = get_tokenizer()
    assert tokenizer.eot_id == EOT_ID == 50256 == reference_gpt2.eot_token
    assert tokenizer.vocab_size == 50257 == reference_gpt2.n_vocab
    assert EOT_ID not in tokenizer.encode("<|endoftext|>")
    assert tokenizer.decode([EOT_ID]) == "<|endoftext|>"
    assert tokenizer.identity() == {"name": "gpt2", "vocab_hash": tokenizer.vocab_hash, "vocab_size": 50257,
                                    "eot_id": 50256}


def test_stream_decoder_holds_a_character_split_across_tokens():
    tokenizer = get_tokenizer()
    text = "a 🙂 and 世界 and é"
    ids = tokenizer.encode(text)
    assert any(tokenizer.token_bytes(i).decode("utf-8", errors="ignore") == "" for i in ids)  # really split
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_any_text_round_trips_with_the_reference_ids(reference_gpt2, text):
    tokenizer = get_tokenizer()
    ids = tokenizer.encode(text)
    assert ids == reference_gpt2.encode_ordinary(text)
    assert all(0 <= i < 50257 for i in ids)
    assert tokenizer.decode(ids) == text


# ---- stop strings -----------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.lists(st.text("ab", max_size=4), min_size=1, max_size=10),
       st.lists(st.text("ab", min_size=1, max_size=5), min_size=1, max_size=4))
def test_stop_text_shows_what_the_definition_says_after_every_piece(pieces, stop):
    """The definition, checked the slow way after every piece: the text ends before the first stop string it
    comes to contain (of those ending at the same character, the longest); until then, all is shown but the
    longest tail that begins a stop string, and the last piece releases that."""
    text, shown, so_far = StopText(tuple(stop)), "", ""
    for number, piece in enumerate(pieces, 1):
        so_far += piece
        final = number == len(pieces)
        out, stopped = text.add(piece, final)
        shown += out
        ends = [end for end in range(1, len(so_far) + 1) if any(so_far[:end].endswith(s) for s in stop)]
        if ends:
            longest = max(len(s) for s in stop if so_far[:ends[0]].endswith(s))
            assert stopped and shown == so_far[:ends[0] - longest]
            return
        held = 0 if final else max((n for s in stop for n in range(1, len(s)) if so_far.endswith(s[:n])), default=0)
        assert not stopped and shown == so_far[:len(so_far) - held]


class CountedStr(str):
    """A stop string that counts the characters read out of it by indexing and slicing."""

    read = 0

    def __getitem__(self, key):
        piece = str.__getitem__(self, key)
        CountedStr.read += len(piece)
        return piece


def test_holding_back_a_long_stop_string_is_linear_in_its_length():
    stop = CountedStr("ab" * 2000 + "c")
    text = StopText((stop,))
    CountedStr.read = 0
    assert [text.add("abab") for _ in range(40)] == [("", False)] * 40  # each piece may begin the stop string
    assert CountedStr.read < 8 * (len(stop) + 40 * 4)  # testing every prefix against the text's end: ~3 x 10^8
