"""`slm bench`: measured throughput of one preset on this machine, printed as a table.

Figures: prepare tokens/s (prepare's own parallel tokenizer on a few MB of the demo corpus), training
tokens/s (the preset's model and batch through train.py's steps on synthetic tokens, warm-up excluded),
generation tokens/s with the KV cache and with full recompute at batch 1 and 8 (through generate.py's
engine), and peak memory; `slm bench generate` (or prepare, train) measures one stage alone. The
numbers are printed and, with --save, recorded with the machine; tests check that they appear, never
how large they are.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from slm.checkpoint import write_text_atomic
from slm.config import Config, flags_from_args, resolve
from slm.device import keep_freed_memory, pick_device, pick_dtype
from slm.errors import SlmError
from slm.generate import SamplingSettings, decode, make_generator
from slm.model import GPT
from slm.prepare import FORMAT_VERSION, token_dtype, tokenize_documents
from slm.stories import demo_documents
from slm.tokenizer import EOT_ID
from slm.train import PretrainBatches, accumulate, build_optimizer, step_optimizer

PREPARE_CHARS = 4_000_000   # a few MB: long enough that starting the worker processes is noise
WARMUP_STEPS = 2            # untimed: first-touch allocations, CUDA kernels picked, torch.compile
SYNTHETIC_TOKENS = 1 << 20  # training windows are drawn from this many random ids
NEW_TOKENS = 200            # per generation run, or fewer so one context window holds them all
GENERATE_BATCHES = (1, 8)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so the clock measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, object]:
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def bench_prepare() -> float:
    """Tokens/s of prepare's tokenizer on every core, over the first PREPARE_CHARS of the demo corpus."""
    docs, chars = [], 0
    for doc in demo_documents("train"):  # made before the clock starts: only tokenizing is timed
        docs.append(doc)
        chars += len(doc)
        if chars >= PREPARE_CHARS:
            break
    start = time.perf_counter()
    tokens = sum(len(chunk.ids) for chunk in tokenize_documents(docs))
    return tokens / (time.perf_counter() - start)


def synthetic_data(folder: Path, vocab_size: int, seed: int) -> None:
    """A prepared folder of random ids, validation empty: training speed does not depend on the text."""
    dtype = token_dtype(vocab_size)
    np.random.default_rng(seed).integers(0, vocab_size, SYNTHETIC_TOKENS).astype(dtype).tofile(folder / "train.bin")
    (folder / "validation.bin").touch()
    splits = {"train": {"tokens": SYNTHETIC_TOKENS, "documents": 0, "bytes": 0},
              "validation": {"tokens": 0, "documents": 0, "bytes": 0}}
    meta = {"format_version": FORMAT_VERSION, "tokenizer": {"name": "synthetic"}, "dtype": dtype.name,
            "source": "slm bench", "splits": splits}
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def bench_train(cfg: Config, device: torch.device, dtype: torch.dtype, steps: int) -> tuple[GPT, float]:
    """(the trained model, training tokens/s over `steps` optimizer steps after WARMUP_STEPS untimed ones)."""
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model).to(device).train()
    compiled = torch.compile(model) if cfg.train.compile else model
    optimizer = build_optimizer(model, cfg.train, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_data(Path(tmp), cfg.model.vocab_size, cfg.train.seed)
        batches = PretrainBatches(tmp, cfg, device)
        for step in range(WARMUP_STEPS + steps):
            if step == WARMUP_STEPS:
                synchronize(device)
                start = time.perf_counter()
            accumulate(compiled, batches(step), device, dtype, scaler)
            step_optimizer(model, optimizer, scaler, cfg.train.grad_clip)
        synchronize(device)
        seconds = time.perf_counter() - start
    return model, steps * cfg.train.batch_size * cfg.model.block_size / seconds


def bench_generate(model: GPT, batch_size: int, new_tokens: int, use_cache: bool) -> float:
    """Generated tokens/s, summed over the batch, sampling as `slm generate` does by default."""
    device = model.transformer.wte.weight.device
    prompts = [[EOT_ID]] * batch_size  # new documents, as with an empty prompt
    generator = make_generator(device, seed=0)

    def run(n: int) -> None:
        settings = SamplingSettings(temperature=0.8, max_new_tokens=n)
        deque(decode(model, prompts, settings, generator, use_cache), maxlen=0)

    run(2)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    run(new_tokens)
    synchronize(device)
    return batch_size * new_tokens / (time.perf_counter() - start)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(peak MB, what was measured): allocated GPU memory on CUDA, else the process's maximum RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max allocated"
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (2**20 if sys.platform == "darwin" else 2**10), "process max RSS"  # bytes on macOS, KB on Linux


def run_bench(preset: str, steps: int, device_name: str, what: str = "all",
              flags: dict[str, dict[str, object]] | None = None) -> dict[str, object]:
    """The figures of `what`: all, prepare, train or generate, for the preset with `flags` over it."""
    cfg = resolve(preset, flags=flags)
    device = pick_device(device_name)
    keep_freed_memory()
    dtype = pick_dtype(cfg.train.dtype, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    figures = {}
    if what in ("all", "prepare"):  # first: its worker processes fork before torch has started any threads
        figures["prepare_tokens_per_s"] = bench_prepare()
    if what in ("all", "train"):
        model, figures["train_tokens_per_s"] = bench_train(cfg, device, dtype, steps)
    else:
        torch.manual_seed(cfg.train.seed)
        model = GPT(cfg.model).to(device)  # untrained: generation speed does not depend on the weights
    new_tokens = min(NEW_TOKENS, cfg.model.block_size - 1)
    if what in ("all", "generate"):
        model.eval()
        figures["generate_tokens_per_s"] = {
            f"{method}_batch_{batch}": bench_generate(model, batch, new_tokens, use_cache)
            for method, use_cache in (("kv_cache", True), ("recompute", False)) for batch in GENERATE_BATCHES}
    peak, peak_kind = peak_memory_mb(device)
    return {"date": datetime.date.today().isoformat(), "preset": preset, "what": what, "device": device.type,
            "dtype": str(dtype).removeprefix("torch."), "machine": machine(device),
            "model": dataclasses.asdict(cfg.model), "parameters": model.num_parameters(),
            "batch_size": cfg.train.batch_size, "micro_batch_size": cfg.train.micro_batch_size,
            "warmup_steps": WARMUP_STEPS, "timed_steps": steps, "new_tokens": new_tokens, **figures,
            "peak_memory_mb": peak, "peak_memory_kind": peak_kind}


def table(r: dict) -> str:
    m, model = r["machine"], r["model"]
    hardware = f"{m['cpu']} ({m['cores']} cores)" + (f", {m['gpu']}" if "gpu" in m else "")
    rows = []
    if "prepare_tokens_per_s" in r:
        rows.append(("prepare: tokenize demo text, all cores", r["prepare_tokens_per_s"], "tokens/s"))
    if "train_tokens_per_s" in r:
        rows.append((f"train: {r['timed_steps']} steps after {r['warmup_steps']} warm-up", r["train_tokens_per_s"],
                     "tokens/s"))
    for name, rate in r.get("generate_tokens_per_s", {}).items():
        method, batch = name.rsplit("_batch_", 1)
        method = "KV cache" if method == "kv_cache" else method
        rows.append((f"generate {r['new_tokens']} tokens, {method}, batch {batch}", rate, "tokens/s"))
    rows.append((f"peak memory ({r['peak_memory_kind']})", r["peak_memory_mb"], "MB"))
    return "\n".join([
        f"slm bench: preset {r['preset']} on {r['device']} ({r['dtype']}), {r['date']}",
        f"machine: {hardware}, torch {m['torch']}, Python {m['python']}",
        f"model: {r['parameters'] / 1e6:.2f}M parameters, {model['n_layer']} layers x {model['n_embd']} wide, "
        f"context {model['block_size']}, " + (f"compact head of {model['vocab_head']:,} ids" if model.get("vocab_head")
                                              else "full vocabulary head")
        + f"; batch {r['batch_size']} x {model['block_size']} tokens",
        "",
        *(f"  {label:<44} {value:>12,.0f} {unit}" for label, value, unit in rows),
    ])


def main(args) -> int:
    if args.steps < 1:
        raise SlmError(f"--steps must be at least 1 (got {args.steps})")
    results = run_bench(args.preset, args.steps, args.device, args.what, flags_from_args(args))
    print(table(results))
    if args.save:
        folder = Path(args.results_dir)
        folder.mkdir(parents=True, exist_ok=True)
        only = "" if args.what == "all" else f"-{args.what}"
        path = folder / f"{results['date']}-{results['preset']}-{results['device']}{only}.json"
        write_text_atomic(path, json.dumps(results, indent=2) + "\n")
        print(f"saved {path}", file=sys.stderr)
    return 0
