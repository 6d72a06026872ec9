"""Shared fixtures: tiny configs, a tiny prepared data folder, a tiny trained run (in this process or as a
`slm train` subprocess), the shared sample, and the one rule for skipping what CI must run."""

import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slm.config import ModelConfig

os.environ["HF_HUB_OFFLINE"] = "1"  # never the network, whatever the shell says
os.environ["HF_DATASETS_OFFLINE"] = "1"
# `--dtype auto` picks bfloat16 on CPUs with native bf16 and float32 elsewhere. The suite pins float32 so that
# its numerics are the same on every CPU; the tests of what auto does take the `auto_resolution` fixture,
# which runs them both ways on any machine (torchrun workers inherit the variable).
os.environ["SLM_CPU_BF16"] = "0"

SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories-sample"


def skip_unless_ci(reason: str) -> None:
    """Skip a test whose outside tool or data is missing here (the browser, llama.cpp, the shared sample);
    under CI=true fail it instead: .ci/run installs all of them, so a skip there would hide a test not run."""
    __tracebackhide__ = True  # pytest then reports the caller's line, not this one
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(params=["float32", "bfloat16"])
def auto_resolution(request, monkeypatch) -> str:
    """Runs a test twice: `--dtype auto` resolving to float32 on the CPU, then to bfloat16 (emulated, so
    slow, where the CPU lacks native bf16: keep such tests small)."""
    monkeypatch.setenv("SLM_CPU_BF16", "1" if request.param == "bfloat16" else "0")
    return request.param


@pytest.fixture
def shared_sample() -> Path:
    if not (SHARED_SAMPLE / "train.txt").is_file():
        skip_unless_ci(f"real TinyStories sample not found at {SHARED_SAMPLE}; put the sample there (train.txt, "
                       "valid.txt) to run this test")
    return SHARED_SAMPLE


def write_prepared(path: Path, train: np.ndarray, validation: np.ndarray, bytes_per_token: float = 4.0) -> Path:
    """A prepared data folder in slm prepare's format, built directly from token arrays."""
    from slm.data.tokenizer import get_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, tokens in (("train", train), ("validation", validation)):
        tokens.astype(np.uint16).tofile(path / f"{name}.bin")
        splits[name] = {"tokens": len(tokens), "documents": int((tokens == 50256).sum()),
                        "bytes": int(len(tokens) * bytes_per_token)}
    meta = {"format_version": 1, "tokenizer": get_tokenizer().identity(), "dtype": "uint16",
            "source": "test", "splits": splits}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def story_tokens(n_docs: int, seed: int) -> np.ndarray:
    """Token ids of short, very regular stories: a tiny model learns them in a few dozen steps."""
    from slm.data.tokenizer import get_tokenizer

    rng = np.random.default_rng(seed)
    tok = get_tokenizer()
    names, things = ["Tom", "Lily", "Sam", "Mia"], ["ball", "cat", "tree", "cake"]
    ids = []
    for _ in range(n_docs):
        name, thing = rng.choice(names), rng.choice(things)
        ids += tok.encode(f"{name} had a {thing}. {name} liked the {thing}. The end.") + [tok.eot_id]
    return np.array(ids, dtype=np.uint16)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("data"), story_tokens(400, 0), story_tokens(40, 1))


def tiny_config(data: Path, **train):
    from slm.config import resolve

    settings = {"data": str(data), "max_steps": 30, "eval_interval": 15, "eval_batches": 2,
                "sample_tokens": 0, "device": "cpu", "warmup_steps": 5}
    settings.update(train)
    return resolve("tiny", flags={"train": settings})


def train(data: Path, run: Path, *extra: str) -> subprocess.CompletedProcess:
    """`slm train` of 12 tiny-preset steps in a new process, on the CPU in float32 unless `extra` flags say
    otherwise (a later flag wins); it must succeed."""
    args = ["train", "--data", str(data), "--out", str(run), "--preset", "tiny", "--max-steps", "12",
            "--eval-interval", "6", "--batch-size", "8", "--micro-batch-size", "2", "--sample-tokens", "0",
            "--device", "cpu", "--warmup-steps", "3", "--dtype", "float32", *extra]
    result = subprocess.run([sys.executable, "-m", "slm", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-8000:]  # room for every rank's error, not only torchrun's summary
    return result


def losses(run: Path, key: str) -> list[float]:
    """RUN/metrics.jsonl's values of `key`, in order: "loss" per step, "val_loss" per evaluation."""
    return [r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data) -> Path:
    """A run trained for a few steps: RUN/{config.toml, metrics.jsonl, best/, last/}."""
    from slm.training.loop import start

    run = tmp_path_factory.mktemp("runs") / "tiny"
    start(tiny_config(tiny_data), run)
    return run


# The URLs tiktoken_ext/openai_public.py gpt2() reads; tiktoken caches each file under sha1(url).
GPT2_URLS = {"vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
             "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"}


@pytest.fixture(scope="session")
def reference_gpt2(tmp_path_factory):
    """tiktoken's own `gpt2` encoding, loaded offline from a cache seeded with the local vocab files."""
    import tiktoken
    import tiktoken.load

    from slm.data.tokenizer import vocab_files

    cache = tmp_path_factory.mktemp("tiktoken-cache")
    vocab_bpe, encoder_json = vocab_files()
    for name, path in (("vocab.bpe", vocab_bpe), ("encoder.json", encoder_json)):
        shutil.copy(path, cache / hashlib.sha1(GPT2_URLS[name].encode()).hexdigest())

    def no_download(url: str) -> bytes:
        raise AssertionError(f"tiktoken tried to download {url}; the seeded cache was not used")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        patch.setattr(tiktoken.load, "read_file", no_download)
        patch.setattr(tiktoken.registry, "ENCODINGS", {})  # build it here, not from an earlier cache
        return tiktoken.get_encoding("gpt2")


def compact_model(counts):
    """A float64 model with a compact head of 10 classes over 101 ids, from these training counts (101,)."""
    import torch

    from slm.config import ModelConfig
    from slm.model.gpt import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=101, block_size=16, n_layer=2, n_head=2, n_embd=32, vocab_head=10))
    model = model.double().eval()
    model.lm_head.set_frequencies(counts)
    return model


@pytest.fixture
def compact():
    """compact_model of random counts, two ids never seen in training."""
    import torch

    counts = torch.randint(1, 1000, (101,), generator=torch.Generator().manual_seed(5))
    counts[[7, 42]] = 0  # never seen in training
    return compact_model(counts), counts


def write_conversations(path, n, seed):
    """Questions whose answer follows from the question alone, in the words of conftest's tiny stories."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            name, thing = rng.choice(["Tom", "Lily", "Sam", "Mia"]), rng.choice(["ball", "cat", "tree", "cake"])
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Tell me about {name} and the {thing}."},
                                             {"role": "assistant", "content": f"{name} had a {thing}."}]}) + "\n")
    return path


# A model small enough for exact decoding tests: 101 ids, a 24-token window that long outputs slide.
CFG = ModelConfig(vocab_size=101, block_size=24, n_layer=2, n_head=2, n_embd=32)


def lively_model(vocab_head: int = 0):
    """A random model whose greedy text varies: its matrices at ten times GPT-2's initial scale. At GPT-2's own
    scale greedy text repeats one or two ids, and a repeated id cannot tell the right context from a wrong one."""
    import torch

    from slm.model.gpt import GPT

    torch.manual_seed(1)
    model = GPT(dataclasses.replace(CFG, vocab_head=vocab_head)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    if vocab_head:
        model.lm_head.set_frequencies(torch.randint(1, 1000, (101,), generator=torch.Generator().manual_seed(5)))
    return model


# Conversations with what a template can get wrong: a system message, surrounding whitespace, several turns,
# a contraction at a boundary, empty messages.
CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"}],
    [{"role": "system", "content": "You tell short stories."},
     {"role": "user", "content": "  Tell me about a cat.\n"},
     {"role": "assistant", "content": "Once upon a time, there was a cat named Tom.\nHe liked milk. "},
     {"role": "user", "content": "And then?"},
     {"role": "assistant", "content": "Then he slept, 100% happy. \u00e9t\u00e9 \U0001F600"}],
    [{"role": "user", "content": "'s odd: it starts with a contraction"}, {"role": "assistant", "content": "'ll do"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}, {"role": "user", "content": "x"}],
]
