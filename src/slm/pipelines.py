"""`slm run demo|tinystories|assistant`: the stages chained, with nothing of their own.

demo, tinystories: prepare -> train -> generate.
assistant: prepare -> make-instructions -> pretraining -> finetune (RECIPE), in one run folder;
a few held-out requests answered, and the pretrained and fine-tuned models' scores side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from slm.config import preset_names, resolve

# Each pretraining pipeline: the corpus to prepare, the preset to train, and overrides of that preset.
PIPELINES = {
    # Offline on 2 CPU cores: a few seconds of preparing, 6 minutes of training, a few stories.
    "demo": {"source": "demo", "preset": "cpu", "train": {"max_minutes": 6.0, "eval_interval": 200}},
    # The real corpus from the hub; sized for one GPU (see docs/training.md for the expected time).
    "tinystories": {"source": "tinystories", "preset": "seed", "train": {}},
}
PROMPTS = ("Once upon a time", "One day, a little", "Tom and his dog")
# `slm run assistant`'s recipe, chosen by measurement (benchmarks/assistant.md): pretraining for
# pretrain_share of the time budget (instruct_share of its rows a story preceded by a request it satisfies:
# measured, not better at equal steps), then fine-tuning on make-instructions' conversations (`epochs` per
# story, fresh choices each).
RECIPE = {"instruct_share": 0.0, "pretrain_share": 0.75, "epochs": 3, "val_fraction": 0.02, "seed": 1337}
ASSISTANT_MINUTES = 20.0
# The sampling an assistant run is served with (slm chat, slm serve, the web page), written into the run:
# words and names pushed only where they fit, no loops, the best of 4 by the checker (benchmarks/assistant.md).
RECIPE_SAMPLING = {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1, "word_bias": 8.0, "word_reach": 2.0,
                   "dry_multiplier": 0.8, "best_of": 4}
KEPT = frozenset({"data", "pretrain", "chat.jsonl", "prompts.jsonl"})  # what RUN holds before fine-tuning


def pretrain(pipeline: str, data_dir: Path, run_dir: Path, max_minutes: float | None, force: bool) -> None:
    from slm.data.prepare import prepare
    from slm.training.loop import start

    spec = PIPELINES[pipeline]
    if (data_dir / "meta.json").is_file() and not force:
        print(f"using the prepared data in {data_dir} (--force prepares it again)", file=sys.stderr)
    else:
        prepare(spec["source"], data_dir, force=True)
    overrides = {"data": str(data_dir), **spec["train"]}
    if max_minutes is not None:
        overrides["max_minutes"] = max_minutes
    start(resolve(spec["preset"], flags={"train": overrides}), run_dir, force=force)


def stories(run_dir: Path) -> None:
    from slm.data.tokenizer import get_tokenizer
    from slm.inference.generate import sample_text
    from slm.runs.checkpoint import checkpoint_dir, load_model

    model, cfg, _ = load_model(checkpoint_dir(run_dir, "best"))
    for i, prompt in enumerate(PROMPTS):
        story = sample_text(model, get_tokenizer(), prompt, max_new_tokens=cfg.model.block_size * 2,
                            temperature=0.8, top_k=40, seed=i)
        print(f"\n--- story {i + 1} ---\n{story.strip()}")


def assistant(source: str, out: Path, max_minutes: float, preset: str, force: bool, eval_prompts: int) -> None:
    """RECIPE's stages into `out`: data/, pretrain/ (the model fine-tuning starts from), chat.jsonl and
    prompts.jsonl, then the assistant itself in `out`, with the sampling it is served with."""
    import shutil

    from slm.assistant.evaluate import read_prompts, score_gold, score_run, table
    from slm.assistant.finetune import finetune
    from slm.assistant.instructions import make_instructions
    from slm.data.prepare import prepare
    from slm.device import pick_device
    from slm.errors import SlmError
    from slm.inference.sampling import SamplingSettings
    from slm.runs.checkpoint import checkpoint_dir, load_model
    from slm.runs.files import SAMPLING_FILE, write_text_atomic
    from slm.training.loop import start

    if max_minutes <= 0:
        raise SlmError(f"--max-minutes must be positive (got {max_minutes:g}); it is the whole training budget")
    if eval_prompts < 1:
        raise SlmError(f"--eval-prompts must be at least 1 (got {eval_prompts})")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise SlmError(f"{out} already exists; pass --force to replace it or choose another --out")
        if not ((out / "config.toml").is_file() or (out / "pretrain").is_dir()):
            raise SlmError(f"{out} is not a run folder of `slm run assistant`; choose an empty or new --out")
        shutil.rmtree(out)
    data = out / "data"
    prepare(source, data, val_fraction=RECIPE["val_fraction"], seed=RECIPE["seed"])
    # The prompts' stories are the prepared validation split's: the same split, or the same hash of (seed, index).
    make_instructions(source, out / "chat.jsonl", out / "prompts.jsonl", held_out_value=RECIPE["val_fraction"],
                      seed=RECIPE["seed"], epochs=RECIPE["epochs"])
    pretrain_minutes = max_minutes * RECIPE["pretrain_share"]
    cfg = resolve(preset, flags={"train": {"data": str(data), "max_minutes": pretrain_minutes, "max_steps": 10**9,
                                           "instruct_share": RECIPE["instruct_share"], "seed": RECIPE["seed"]}})
    start(cfg, out / "pretrain")
    finetune(out / "pretrain", out / "chat.jsonl", out, val_data=out / "prompts.jsonl", keep=KEPT,
             # AdamW whatever pretrained the base: the fine-tuning benchmarks/assistant.md measured
             flags={"max_minutes": max_minutes - pretrain_minutes, "max_steps": 10**9, "eval_interval": 100,
                    "optimizer": "adamw"})
    write_text_atomic(out / SAMPLING_FILE, json.dumps(RECIPE_SAMPLING, indent=2) + "\n")

    prompts = read_prompts(out / "prompts.jsonl")[:eval_prompts]
    device, served = pick_device("auto"), SamplingSettings(**RECIPE_SAMPLING, max_new_tokens=256)
    fluency, _, _ = load_model(checkpoint_dir(out / "pretrain", "best"), device)
    gold, gold_spikes = score_gold(prompts, fluency)
    results = [{"run": "gold", "scores": gold}]
    for run in (out / "pretrain", out):
        scores, answers = score_run(checkpoint_dir(run, "best"), prompts, device, served, 0, 8,
                                    fluency=fluency, gold_spikes=gold_spikes)
        results.append({"run": str(run), "scores": scores})
    for (_, messages), answer in zip(prompts[:3], answers):
        print(f"\n--- request ---\n{messages[-1]['content'].strip()}\n--- answer ---\n{answer.strip()}")
    how = ", ".join(f"{key} {value:g}" for key, value in RECIPE_SAMPLING.items())
    print(f"\nassistant scores on {len(prompts)} requests from held-out stories ({how}, seed 0):\n{table(results)}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", choices=(*PIPELINES, "assistant"), help="which pipeline")
    p.add_argument("--out", default=None, help="run folder (default: runs/PIPELINE)")
    p.add_argument("--data-out", default=None, help="prepared data folder of demo and tinystories "
                   "(default: data/PIPELINE); assistant keeps its own in OUT/data")
    p.add_argument("--max-minutes", type=float, default=None, help="training time budget in minutes "
                   f"(assistant: of both stages together; default {ASSISTANT_MINUTES:g})")
    p.add_argument("--source", default=None, help="assistant: the story corpus, any source `slm prepare` takes "
                   "(default: demo)")
    p.add_argument("--preset", default=None, choices=preset_names(),
                   help="assistant: the model and batch preset of both stages (default: cpu)")
    p.add_argument("--eval-prompts", type=int, default=60,
                   help="assistant: held-out requests scored at the end, per model (default: 60)")
    p.add_argument("--force", action="store_true", help="replace existing data and run folders")


def main(args) -> int:
    started = time.perf_counter()
    if args.pipeline == "assistant":
        out = Path(args.out or "runs/assistant")
        minutes = ASSISTANT_MINUTES if args.max_minutes is None else args.max_minutes
        assistant(args.source or "demo", out, minutes, args.preset or "cpu", args.force, args.eval_prompts)
    else:
        out = Path(args.out or f"runs/{args.pipeline}")
        pretrain(args.pipeline, Path(args.data_out or f"data/{args.pipeline}"), out, args.max_minutes, args.force)
        stories(out)
    print(f"\n{args.pipeline}: done in {(time.perf_counter() - started) / 60:.1f} min; the model is in {out} "
          f"(try `slm {'chat' if args.pipeline == 'assistant' else 'generate'} {out}`)", file=sys.stderr)
    return 0
