"""The model card: RUN/README.md says what the model is, what it was trained on and how training went.

Training rewrites it at every evaluation (with the newest sample and RUN/curves.png); `slm export` copies it
into the Hugging Face folder under the Hub's metadata header, so a run and its export carry one card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slm.config import Config
from slm.runs.files import read_metrics
from slm.runs.listing import Progress, duration
from slm.runs.plot import CURVES

CARD = "README.md"
HUB_HEADER = "---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags: [slm, gpt2]\n---\n\n"


def training_data(run: Path, cfg: Config) -> str:
    if (run / "finetune.json").is_file():
        recipe = json.loads((run / "finetune.json").read_text(encoding="utf-8"))
        return f"fine-tuned from {recipe.get('base')} on the chat data {recipe.get('data')}"
    return cfg.train.data or "(not recorded)"


def model_card(run: Path, cfg: Config, parameters: int, records: list[dict[str, Any]], sample: str = "") -> str:
    """The card's markdown, from the run's files and metrics.jsonl records, its parameter count and the
    newest sample."""
    progress = Progress.of(records)
    best = progress.best
    validation = (f"best loss {best['val_loss']:.4f} at step {best['step']:,}"
                  + (f" ({best['val_bpb']:.4f} bits per byte)" if "val_bpb" in best else "")) if best else "none yet"
    m = cfg.model
    rows = "\n".join(f"| {section} | {k} | {v} |"
                     for section, fields in cfg.to_dict().items() for k, v in fields.items())
    return (f"# {run.name}\n\nA GPT-2-style language model trained from scratch with slm.\n\n"
            f"- Training data: {training_data(run, cfg)}\n"
            f"- Model: {parameters / 1e6:.2f}M parameters, {m.n_layer} layers x {m.n_embd} wide, {m.n_head} heads, "
            f"context {m.block_size} tokens; GPT-2 BPE tokenizer (50,257 ids)\n"
            f"- Trained: {progress.steps:,} optimizer steps, {progress.tokens_seen:,} tokens seen, "
            f"{duration(progress.wall_seconds)}\n"
            f"- Validation: {validation}\n\n"
            + (f"![training curves]({CURVES})\n\n" if (run / CURVES).is_file() else "")
            + (f"## A sample\n\n```text\n{sample.strip()}\n```\n\n" if sample.strip() else "")
            + f"## Config (slm's config.toml)\n\n| section | field | value |\n|---|---|---|\n{rows}\n")


def hub_card(run: Path, cfg: Config, parameters: int, name: str) -> str:
    """README.md of the Hugging Face folder: the run's card (or a fresh one, for a run without one), under
    the Hub's metadata, with how to load it."""
    card = ((run / CARD).read_text(encoding="utf-8") if (run / CARD).is_file()
            else model_card(run, cfg, parameters, read_metrics(run / "metrics.jsonl")))
    return (f"{HUB_HEADER}{card}\n## Use it with transformers\n\n```python\nfrom transformers import pipeline\n"
            f"generator = pipeline(\"text-generation\", model=\"{name}\")\n"
            f"print(generator(\"Once upon a time\")[0][\"generated_text\"])\n```\n")
