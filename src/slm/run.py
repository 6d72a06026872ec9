"""`slm run demo|tinystories|assistant`: the stages chained, with nothing of their own.

demo, tinystories: prepare -> train -> generate.
assistant: a base run (reused, or trained as `slm run demo` does) -> make-instructions -> finetune ->
a few held-out instructions answered, and both runs' assistant scores side by side.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from slm.config import resolve

# Each pretraining pipeline: the corpus to prepare, the preset to train, and overrides of that preset.
PIPELINES = {
    # Offline on 2 CPU cores: a few seconds of preparing, 6 minutes of training, a few stories.
    "demo": {"source": "demo", "preset": "cpu", "train": {"max_minutes": 6.0, "eval_interval": 200}},
    # The real corpus from the hub; sized for one GPU (see the README for the expected time).
    "tinystories": {"source": "tinystories", "preset": "seed", "train": {}},
}
PROMPTS = ("Once upon a time", "One day, a little", "Tom and his dog")
ASSISTANT_STEPS = 300
ASSISTANT_PROMPTS = 60  # held-out prompts scored per run: enough to compare, quick on a CPU


def pretrain(pipeline: str, data_dir: Path, run_dir: Path, max_minutes: float | None, force: bool) -> None:
    from slm import prepare, train

    spec = PIPELINES[pipeline]
    if (data_dir / "meta.json").is_file() and not force:
        print(f"using the prepared data in {data_dir} (--force prepares it again)", file=sys.stderr)
    else:
        prepare.prepare(spec["source"], data_dir, force=True)
    overrides = {"data": str(data_dir), **spec["train"]}
    if max_minutes is not None:
        overrides["max_minutes"] = max_minutes
    train.start(resolve(spec["preset"], flags={"train": overrides}), run_dir, force=force)


def stories(run_dir: Path) -> None:
    from slm.checkpoint import checkpoint_dir, load_model
    from slm.generate import sample_text
    from slm.tokenizer import get_tokenizer

    model, cfg, _ = load_model(checkpoint_dir(run_dir, "best"))
    for i, prompt in enumerate(PROMPTS):
        story = sample_text(model, get_tokenizer(), prompt, max_new_tokens=cfg.model.block_size * 2,
                            temperature=0.8, top_k=40, seed=i)
        print(f"\n--- story {i + 1} ---\n{story.strip()}")


def assistant(base: Path, data_dir: Path, out: Path, force: bool) -> None:
    from slm.chat import prompt_ids
    from slm.checkpoint import checkpoint_dir, load_model
    from slm.device import pick_device
    from slm.eval_assistant import read_prompts, score_run, table
    from slm.finetune import finetune
    from slm.generate import SamplingSettings, complete
    from slm.instructions import make_instructions
    from slm.tokenizer import get_tokenizer

    chat, held_out = data_dir / "chat.jsonl", data_dir / "prompts.jsonl"
    if chat.is_file() and held_out.is_file() and not force:
        print(f"using the instructions in {chat} (--force makes them again)", file=sys.stderr)
    else:
        data_dir.mkdir(parents=True, exist_ok=True)
        make_instructions("demo", chat, held_out, held_out_value=100, force=True)
    finetune(base, chat, out, val_data=held_out, flags={"max_steps": ASSISTANT_STEPS}, force=force)

    prompts = read_prompts(held_out)[:ASSISTANT_PROMPTS]
    device = pick_device("auto")
    settings = SamplingSettings(temperature=0.0, max_new_tokens=160)
    model, _, _ = load_model(checkpoint_dir(out, "best"), device)
    answers = complete(model, get_tokenizer(), [prompt_ids(messages) for _, messages in prompts[:3]], settings)
    for (_, messages), answer in zip(prompts[:3], answers):
        print(f"\n--- instruction ---\n{messages[-1]['content'].strip()}\n--- answer ---\n{answer.text.strip()}")
    results = [{"run": str(run), **score_run(checkpoint_dir(run, "best"), prompts, device, settings, 0, 8)}
               for run in (base, out)]
    print(f"\nassistant scores on {len(prompts)} held-out prompts (greedy):\n{table(results)}")


def main(args) -> int:
    started = time.perf_counter()
    if args.pipeline == "assistant":
        base = Path(args.base or "runs/demo")
        if not (base / "config.toml").is_file():
            pretrain("demo", Path(args.data_out or "data/demo"), base, args.max_minutes, args.force)
        out = Path(args.out or "runs/assistant")
        assistant(base, Path("data/assistant"), out, args.force)
    else:
        out = Path(args.out or f"runs/{args.pipeline}")
        pretrain(args.pipeline, Path(args.data_out or f"data/{args.pipeline}"), out, args.max_minutes, args.force)
        stories(out)
    print(f"\n{args.pipeline}: done in {(time.perf_counter() - started) / 60:.1f} min; the model is in {out} "
          f"(try `slm {'chat' if args.pipeline == 'assistant' else 'generate'} {out}`)", file=sys.stderr)
    return 0
