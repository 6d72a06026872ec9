"""`slm bench`: measured throughput on this machine, printed as a table, each speed also as a share of the
machine's own limit (slm.peak).

Figures: first the limits (float32 and bfloat16 GEMM FLOP/s at the benched models' shapes, read bandwidth from
memory and of a decoding step's working set); prepare tokens/s (prepare's own parallel tokenizer on a few MB
of the demo corpus); training tokens/s at nanoGPT's CPU configuration (4 layers x 128, context 128, batch 32,
GPT-2's vocabulary) in float32 and bfloat16, with the full head and with a compact head of 8,192 ids, and for
the chosen preset (each through the training loop's own steps on synthetic tokens, warm-up excluded), with
its share of the measured GEMM peak of its dtype (on a known GPU also as MFU of the datasheet's); generation
tokens/s of the preset's model with the KV cache and with full recompute at batch 1 and 8
(inference.generate.decode: the engine, or the recompute reference), and greedy at batch 1 with its share
of the read bandwidth, beside llama.cpp's on the same model exported to GGUF f16 and q8_0 (where
llama-cpp-python is installed); and peak memory.
`slm bench nanogpt` (or prepare, peak, train, generate) measures one part alone. `slm bench optimizers` is not a
speed figure: it trains the preset on prepared data once per optimizer (the same seed, data and budget) and
reports the steps and minutes each took to reach a validation loss. The numbers are printed and, with
--save, recorded with the machine; tests check that they appear, never how large they are.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from slm.config import OPTIMIZERS, Config, ModelConfig, add_config_flags, flags_from_args, preset_names, resolve
from slm.data.prepare import FORMAT_VERSION, token_dtype, tokenize_documents
from slm.data.stories import demo_documents
from slm.data.tokenizer import EOT_ID, get_tokenizer
from slm.data.windows import PretrainBatches
from slm.device import World, cpu_has_bf16, keep_freed_memory, machine, pick_device, pick_dtype
from slm.errors import SlmError
from slm.inference.generate import decode
from slm.inference.sampling import DEFAULT_TEMPERATURE, SamplingSettings, make_generator
from slm.model.gpt import GPT
from slm.peak import DRAM_BYTES, decode_bytes_per_token, measure, model_flops_utilization, train_flops_per_token
from slm.peers import LLAMA_CPP_OUTTYPES, bench_llama_cpp, llama_cpp_missing
from slm.runs.files import read_metrics, write_text_atomic
from slm.training.loop import accumulate, build_trainer, start, step_optimizer

PREPARE_CHARS = 4_000_000   # a few MB: long enough that starting the worker processes is noise
WARMUP_STEPS = 2            # untimed: first-touch allocations, CUDA kernels picked, torch.compile
EMULATED_BF16_STEPS = 2     # at most, timed after one warm-up: emulated bf16 takes over a minute a step
SYNTHETIC_TOKENS = 1 << 20  # training windows are drawn from this many random ids
GENERATE_BATCHES = (1, 8)
# nanoGPT's CPU configuration, against which the targets are set; config flags still override it.
NANOGPT = {"model": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, "vocab_head": 0, "dropout": 0.0},
           "train": {"batch_size": 32, "micro_batch_size": 32}}
NANOGPT_CASES = (("float32", 0), ("bfloat16", 0), ("float32", 8192), ("bfloat16", 8192))  # (dtype, vocab_head)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so the clock measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_prepare() -> float:
    """Tokens/s of prepare's tokenizer on every core, over the first PREPARE_CHARS of the demo corpus."""
    docs, chars = [], 0
    for doc in demo_documents("train"):  # made before the clock starts: only tokenizing is timed
        docs.append(doc)
        chars += len(doc)
        if chars >= PREPARE_CHARS:
            break
    get_tokenizer()  # built once per process (and inherited by the workers), not per corpus: not timed
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


def bench_train(cfg: Config, device: torch.device, dtype: torch.dtype, steps: int,
                warmup: int = WARMUP_STEPS) -> tuple[GPT, float]:
    """(the trained model, training tokens/s over `steps` optimizer steps after `warmup` untimed ones)."""
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model).to(device).train()
    trainer = build_trainer(model, cfg.train, World(), device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_data(Path(tmp), cfg.model.vocab_size, cfg.train.seed)
        batches = PretrainBatches(tmp, cfg, device)
        for step in range(warmup + steps):
            if step == warmup:
                synchronize(device)
                start = time.perf_counter()
            accumulate(trainer.trained, batches(step), device, dtype, trainer.scaler)
            step_optimizer(model, trainer.optimizers, trainer.scaler, cfg.train.grad_clip)
        synchronize(device)
        seconds = time.perf_counter() - start
    return model, steps * cfg.train.batch_size * cfg.model.block_size / seconds


def bench_generate(model: GPT, batch_size: int, new_tokens: int, use_cache: bool,
                   temperature: float = DEFAULT_TEMPERATURE) -> float:
    """Generated tokens/s, summed over the batch, sampling as `slm generate` does by default (0: greedy)."""
    device = model.transformer.wte.weight.device
    prompts = [[EOT_ID]] * batch_size  # new documents, as with an empty prompt
    generator = make_generator(device, seed=0)

    def run(n: int) -> None:
        settings = SamplingSettings(temperature=temperature, max_new_tokens=n)
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


def nanogpt_configs(flags: dict[str, dict[str, object]]) -> list[Config]:
    """NANOGPT_CASES as configs: nanoGPT's shape, then the user's flags, then each case's dtype and head."""
    return [resolve(flags={"model": {**NANOGPT["model"], **flags.get("model", {}), "vocab_head": vocab_head},
                           "train": {**NANOGPT["train"], **flags.get("train", {}), "dtype": dtype}})
            for dtype, vocab_head in NANOGPT_CASES]


def train_row(name: str, cfg: Config, device: torch.device, steps: int) -> tuple[GPT, dict[str, object]]:
    """One training row. bf16 on a CPU without bf16 instructions runs fewer steps: it is emulated, 10-20x
    slower than float32, and its figure only shows that; the row records how many steps were timed."""
    dtype = pick_dtype(cfg.train.dtype, device)
    emulated = dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16()
    warmup, steps = (1, min(steps, EMULATED_BF16_STEPS)) if emulated else (WARMUP_STEPS, steps)
    model, rate = bench_train(cfg, device, dtype, steps, warmup)
    return model, {"name": name, "model": dataclasses.asdict(cfg.model), "parameters": model.num_parameters(),
                   "batch_size": cfg.train.batch_size, "micro_batch_size": cfg.train.micro_batch_size,
                   "dtype": str(dtype).removeprefix("torch."), "emulated_bf16": emulated, "warmup_steps": warmup,
                   "timed_steps": steps, "tokens_per_s": rate, "mfu": model_flops_utilization(cfg.model, rate, device)}


def bench_optimizers(cfg: Config, target_loss: float) -> list[dict[str, object]]:
    """Train cfg with each optimizer through `slm train`'s own start (the same seed, data and budget, samples
    off) into a temporary run, and read its metrics.jsonl: the first evaluation at or below target_loss, the
    step and the wall time when it came (evaluations included, the same for every optimizer), the last
    validation loss and the training tokens/s."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for optimizer in OPTIMIZERS:
            settings = dataclasses.replace(cfg.train, optimizer=optimizer, sample_tokens=0)
            state = start(dataclasses.replace(cfg, train=settings), Path(tmp) / optimizer)
            records = read_metrics(Path(tmp) / optimizer / "metrics.jsonl")
            seconds = {r["step"]: r["wall_seconds"] for r in records if "loss" in r}
            evaluations = [[r["step"], r["val_loss"], seconds[r["step"]]] for r in records if "val_loss" in r]
            step, _, wall = next((e for e in evaluations if e[1] <= target_loss), (None, None, None))
            rows.append({"optimizer": optimizer, "steps_to_target": step,
                         "minutes_to_target": None if wall is None else wall / 60, "final_val_loss": evaluations[-1][1],
                         "steps": state.step, "tokens_per_s": state.tokens_seen / state.train_seconds,
                         "evaluations": evaluations})
    return rows


def run_bench(preset: str, steps: int, device_name: str, what: str = "all",
              flags: dict[str, dict[str, object]] | None = None, new_tokens: int = 200, data: str | None = None,
              target_loss: float | None = None) -> dict[str, object]:
    """The figures of `what` (all, prepare, peak, nanogpt, train, generate, or optimizers on `data` to
    `target_loss`) for the preset with `flags` over it, each speed also as a share of this machine's limit."""
    flags = flags or {}
    cfg = resolve(preset, flags=flags)
    device = pick_device(device_name)
    keep_freed_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result: dict[str, object] = {"date": datetime.date.today().isoformat(), "preset": preset, "what": what,
                                 "device": device.type, "native_cpu_bf16": cpu_has_bf16(), "machine": machine(device),
                                 "warmup_steps": WARMUP_STEPS, "timed_steps": steps}
    if what in ("all", "prepare"):  # first: its worker processes fork before torch has started any threads
        result["prepare_tokens_per_s"] = bench_prepare()
    trained = (nanogpt_configs(flags) if what in ("all", "peak", "nanogpt") else []) + (
        [cfg] if what in ("all", "peak", "train") else [])
    context = min(new_tokens, cfg.model.block_size) / 2  # the mean context of a generation from one id
    if what in ("all", "peak", "nanogpt", "train", "generate"):  # the limits before the figures they judge
        result["peak"] = measure([c.model for c in trained], [c.train.micro_batch_size * c.model.block_size
                                                               for c in trained], device,
                                 None if what in ("nanogpt", "train") else
                                 int(decode_bytes_per_token(cfg.model, 4, context)))
    rows = []
    if what in ("all", "nanogpt"):
        rows += [train_row("nanoGPT", case, device, steps)[1] for case in nanogpt_configs(flags)]
    model = None
    if what in ("all", "train"):
        model, row = train_row(f"preset {preset}", cfg, device, steps)
        rows.append(row)
    for row in rows:
        flops = train_flops_per_token(ModelConfig(**row["model"])) * row["tokens_per_s"]
        row["peak_share"] = flops / result["peak"]["peak_flops"][row["dtype"]]
    if rows:
        result["train"] = rows
    if what == "optimizers":
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, data=data, device=device_name))
        result["optimizers"] = {"target_loss": target_loss, "data": data, "max_minutes": cfg.train.max_minutes,
                                "max_steps": cfg.train.max_steps, "eval_interval": cfg.train.eval_interval,
                                "rows": bench_optimizers(cfg, target_loss)}
    if what in ("all", "generate"):
        result["generate"] = generate_figures(model, cfg, device, new_tokens, context, result["peak"])
    result["peak_memory_mb"], result["peak_memory_kind"] = peak_memory_mb(device)
    return result


def generate_figures(model: GPT | None, cfg: Config, device: torch.device, new_tokens: int, context: float,
                     limits: dict) -> dict[str, object]:
    """Generation tokens/s (KV cache and recompute, batch 1 and 8; greedy at batch 1; llama.cpp on the model's
    GGUF exports) and greedy batch 1's share of each read bandwidth at the bytes a step reads."""
    if model is None:
        torch.manual_seed(cfg.train.seed)
        model = GPT(cfg.model).to(device)  # untrained: generation speed does not depend on the weights
    model.eval()
    rates = {f"{method}_batch_{batch}": bench_generate(model, batch, new_tokens, use_cache)
             for method, use_cache in (("kv_cache", True), ("recompute", False)) for batch in GENERATE_BATCHES}
    rates["kv_cache_batch_1_greedy"] = bench_generate(model, 1, new_tokens, use_cache=True, temperature=0)
    figures = {"model": dataclasses.asdict(cfg.model), "parameters": model.num_parameters(), "new_tokens": new_tokens,
               "tokens_per_s": rates, "threads": torch.get_num_threads(), "mean_context": context}
    missing = llama_cpp_missing(device, cfg.model)
    for outtype in LLAMA_CPP_OUTTYPES if missing is None else ():
        try:
            rates[f"llama_cpp_{outtype}_batch_1_greedy"] = bench_llama_cpp(model, cfg, new_tokens, outtype)
        except SlmError as err:
            figures.setdefault("llama_cpp_failed", {})[outtype] = str(err)
    if missing:
        figures["llama_cpp_missing"] = missing
    step_bytes = decode_bytes_per_token(cfg.model, model.transformer.wte.weight.element_size(), context)
    figures["bytes_per_token"] = step_bytes
    figures["bandwidth_share"] = {where: step_bytes * rates["kv_cache_batch_1_greedy"] / bandwidth
                                  for where, bandwidth in limits["read_bytes_per_s"].items()}
    return figures


def shape(model: dict, parameters: int) -> str:
    head = f"compact head {model['vocab_head']:,}" if model.get("vocab_head") else "full head"
    return f"{model['n_layer']}x{model['n_embd']}, ctx {model['block_size']}, {head}, {parameters / 1e6:.1f}M"


def table(r: dict) -> str:
    m = r["machine"]
    hardware = f"{m['cpu']} ({m['cores']} cores)" + (f", {m['gpu']}" if "gpu" in m else "")
    bf16 = "" if r["device"] != "cpu" else (" (native bf16)" if r["native_cpu_bf16"] else
                                            " (no native bf16: PyTorch emulates it)")
    rows = peak_rows(r["peak"], r["what"] == "peak") if "peak" in r else []
    if "prepare_tokens_per_s" in r:
        rows.append(("prepare: tokenize demo text, all cores", r["prepare_tokens_per_s"], "tokens/s"))
    for row in r.get("train", []):
        emulated = f" (emulated, {row['timed_steps']} steps)" if row.get("emulated_bf16") else ""
        rows.append((f"train {row['name']}: {shape(row['model'], row['parameters'])}, batch {row['batch_size']}, "
                     f"{row['dtype']}{emulated}", row["tokens_per_s"], "tokens/s"))
        if "peak_share" in row:
            rows.append((f"  its share of this machine's {row['dtype']} GEMM peak", 100 * row["peak_share"], "%"))
        if row.get("mfu") is not None:
            rows.append(("  MFU: its share of the GPU's dense bf16 peak", 100 * row["mfu"], "%"))
    notes = []
    if "generate" in r:
        g, rates = r["generate"], r["generate"]["tokens_per_s"]
        for method, use_cache in (("KV cache", "kv_cache"), ("recompute", "recompute")):
            for batch in GENERATE_BATCHES:
                rows.append((f"generate {g['new_tokens']} tokens, {method}, batch {batch}",
                             rates[f"{use_cache}_batch_{batch}"], "tokens/s"))
        for batch in GENERATE_BATCHES:
            speedup = rates[f"kv_cache_batch_{batch}"] / rates[f"recompute_batch_{batch}"]
            rows.append((f"KV cache speed-up, batch {batch}", speedup, "x"))
        rows.append((f"generate {g['new_tokens']} tokens, KV cache, batch 1, greedy", rates["kv_cache_batch_1_greedy"],
                     "tokens/s"))
        for where, share in g.get("bandwidth_share", {}).items():
            rows.append((f"  share of the {where} read bandwidth at {g['bytes_per_token'] / 1e6:.1f} MB a token",
                         100 * share, "%"))
        threads = f"{g['threads']} thread{'s' if g['threads'] > 1 else ''}"
        for outtype, failed in g.get("llama_cpp_failed", {}).items():
            notes.append(f"no llama.cpp {outtype} row: {failed}")
        for outtype in (o for o in LLAMA_CPP_OUTTYPES if f"llama_cpp_{o}_batch_1_greedy" in rates):
            llama = rates[f"llama_cpp_{outtype}_batch_1_greedy"]
            rows.append((f"llama.cpp {g['new_tokens']} tokens, batch 1, greedy (this model as GGUF {outtype}, "
                         f"{threads})", llama, "tokens/s"))
            rows.append((f"slm / llama.cpp {outtype}, batch 1, greedy", rates["kv_cache_batch_1_greedy"] / llama, "x"))
        if "llama_cpp_missing" in g:
            notes.append(f"no llama.cpp row: {g['llama_cpp_missing']}")
    rows.append((f"peak memory ({r['peak_memory_kind']})", r["peak_memory_mb"], "MB"))
    timed = f": {r['timed_steps']} timed training steps after {r['warmup_steps']} warm-up" if "train" in r else ""
    lines = [f"slm bench on {r['device']}{bf16}, {r['date']}{timed}",
             f"machine: {hardware}, torch {m['torch']}, Python {m['python']}"]
    if "optimizers" in r:
        lines += ["", *optimizers_table(r["optimizers"], r["preset"])]
    if "generate" in r:
        lines.append(f"generation model: preset {r['preset']}, "
                     f"{shape(r['generate']['model'], r['generate']['parameters'])}")
    width = max(len(label) for label, _, _ in rows)
    decimals = {"x": 2, "%": 1}  # a ratio such as slm / llama.cpp to 1%
    return "\n".join(lines + [""] + [f"  {label:<{width}} {value:>10,.{decimals.get(unit, 0)}f} {unit}"
                                     for label, value, unit in rows] + [f"  {note}" for note in notes])


def peak_rows(p: dict, every_shape: bool) -> list[tuple[str, float, str]]:
    """The machine's limits: each dtype's best GEMM (with every shape's on `slm bench peak`) and bandwidths."""
    rows = []
    for dtype, rates in p["gemm_flops"].items():
        best = max(rates, key=rates.get)
        rows.append((f"peak: {dtype} GEMM, best of the models' shapes ({best})", rates[best] / 1e9, "GFLOP/s"))
        rows += [(f"  {dtype} GEMM {name}", rate / 1e9, "GFLOP/s") for name, rate in rates.items() if every_shape]
    for where, rate in p["read_bytes_per_s"].items():
        size = p["working_set_bytes"] if where == "decode working set" else DRAM_BYTES
        rows.append((f"peak: read bandwidth, {where} ({size / 2**20:,.1f} MiB)", rate / 1e9, "GB/s"))
    return rows


def optimizers_table(o: dict, preset: str) -> list[str]:
    budget = f"{o['max_minutes']:g} minutes" if o["max_minutes"] else f"{o['max_steps']:,} steps"
    target = f"{o['target_loss']:g}"
    lines = [f"optimizers: preset {preset} on {o['data']}, {budget} each, validation every {o['eval_interval']} steps",
             f"  {'optimizer':<10} {'steps to ' + target:>14} {'minutes to ' + target:>16} {'final val loss':>15} "
             f"{'steps':>7} {'tokens/s':>9}"]
    for row in o["rows"]:
        reached = row["steps_to_target"] is not None
        minutes = f"{row['minutes_to_target']:.2f}" if reached else "-"
        lines.append(f"  {row['optimizer']:<10} {row['steps_to_target'] if reached else 'not reached':>14} "
                     f"{minutes:>16} {row['final_val_loss']:>15.4f} {row['steps']:>7,} {row['tokens_per_s']:>9,.0f}")
    return lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", nargs="?", choices=("all", "prepare", "peak", "nanogpt", "train", "generate", "optimizers"),
                   default="all", help="measure only this part (default: all); optimizers: steps and minutes to "
                   "--target-loss for each optimizer, trained on --data within the preset's budget")
    p.add_argument("--preset", choices=preset_names(), default="cpu",
                   help="model and batch of the train and generate figures (default: cpu)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps after warm-up (default: 10)")
    p.add_argument("--new-tokens", type=int, default=200, help="tokens per generation run (default: 200)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.add_argument("--save", action="store_true", help="also write the results as JSON into --results-dir")
    p.add_argument("--results-dir", default="benchmarks/results",
                   help="folder for --save's DATE-PRESET-DEVICE[-PART].json (default: benchmarks/results)")
    p.add_argument("--data", help="folder made by `slm prepare`, for `slm bench optimizers`")
    p.add_argument("--target-loss", type=float, help="validation loss `slm bench optimizers` times each optimizer to")
    add_config_flags(p, exclude=("data", "device"))


def main(args) -> int:
    if args.steps < 1:
        raise SlmError(f"--steps must be at least 1 (got {args.steps})")
    if args.new_tokens < 1:
        raise SlmError(f"--new-tokens must be at least 1 (got {args.new_tokens})")
    if args.what == "optimizers" and not (args.data and args.target_loss and args.target_loss > 0):
        raise SlmError(f"slm bench optimizers needs --data DIR (a folder made by `slm prepare`) and a positive "
                       f"--target-loss (got {args.data!r} and {args.target_loss})")
    results = run_bench(args.preset, args.steps, args.device, args.what, flags_from_args(args), args.new_tokens,
                        args.data, args.target_loss)
    print(table(results))
    if args.save:
        folder = Path(args.results_dir)
        folder.mkdir(parents=True, exist_ok=True)
        only = "" if args.what == "all" else f"-{args.what}"
        path = folder / f"{results['date']}-{results['preset']}-{results['device']}{only}.json"
        write_text_atomic(path, json.dumps(results, indent=2) + "\n")
        print(f"saved {path}", file=sys.stderr)
    return 0
