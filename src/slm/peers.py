"""The peers slm's figures are measured beside, on the same model and machine: llama.cpp, through
llama-cpp-python, on the model's GGUF exports."""

from __future__ import annotations

import importlib.util
import multiprocessing
import signal
import tempfile
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import torch

from slm.config import Config, ModelConfig
from slm.data.tokenizer import EOT_ID, get_tokenizer
from slm.errors import SlmError
from slm.interop.gguf_file import export_gguf
from slm.model.gpt import GPT
from slm.runs import checkpoint

LLAMA_CPP_OUTTYPES = ("f16", "q8_0")  # `slm export --format gguf`'s default and its 8-bit quantization


def isolated(target: Callable[..., float], *args: object) -> float:
    """target(*args) in a fresh process, so that a peer crashing in native code (llama.cpp's AMX kernels
    segfault on batches of q8_0 rows: ggml-org/llama.cpp#20824) is an SlmError, not the end of the bench."""
    context = multiprocessing.get_context("spawn")  # not fork: torch's threads are running here
    results = context.Queue()
    child = context.Process(target=_put_result, args=(results, target, *args))
    child.start()
    child.join()
    if child.exitcode != 0:
        how = signal.Signals(-child.exitcode).name if child.exitcode < 0 else f"exit status {child.exitcode}"
        raise SlmError(f"its process ended by {how}")
    return results.get()


def _put_result(results: multiprocessing.Queue, target: Callable[..., float], *args: object) -> None:
    results.put(target(*args))


def llama_cpp_rate(gguf: str, block: int, threads: int, new_tokens: int) -> float:
    """Greedy batch-1 tokens/s of llama.cpp on the GGUF file, from an end-of-text prompt. Its window slides as
    decode's does: once the context is full, it starts again from the newest block // 2 ids."""
    import llama_cpp

    def run(llm: llama_cpp.Llama, n: int) -> None:
        ids = [EOT_ID]
        while len(ids) <= n:
            context = ids[-(block // 2):] if len(ids) > 1 else ids
            llm.reset()  # no reuse of a cached prefix: the same work as decode's refill
            ids += islice(llm.generate(context, temp=0.0), min(n + 1 - len(ids), block - len(context) + 1))

    llm = llama_cpp.Llama(model_path=gguf, n_ctx=block, n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        run(llm, 2)  # warm-up
        start = time.perf_counter()
        run(llm, new_tokens)
        return new_tokens / (time.perf_counter() - start)
    finally:
        llm.close()


def bench_llama_cpp(model: GPT, cfg: Config, new_tokens: int, outtype: str) -> float:
    """llama.cpp's greedy batch-1 tokens/s on this model exported by `slm export --format gguf --outtype
    OUTTYPE`, through llama-cpp-python on torch's thread count, in a process of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save(Path(tmp), "best", model, cfg, get_tokenizer().identity())
        gguf = str(export_gguf(tmp, Path(tmp) / "model.gguf", outtype=outtype))
        return isolated(llama_cpp_rate, gguf, cfg.model.block_size, torch.get_num_threads(), new_tokens)


def llama_cpp_missing(device: torch.device, model: ModelConfig) -> str | None:
    """Why there can be no llama.cpp row here, or None."""
    if device.type != "cpu":
        return f"llama-cpp-python's row is measured on the CPU, not on {device.type}"
    if not model.bias:
        return "the model has bias=False, which GGUF's gpt2 architecture cannot express"
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)"
    return None
