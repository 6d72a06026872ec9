"""Rejection-sampling fine-tuning data (issue 28's lever (a)): a run answers its own training requests the way
it is served, and only answers that do everything asked, with no flaw and no forced word, are kept as new
conversations to fine-tune on (self-distillation).

    python benchmarks/self_distill.py RUN --requests RUN/chat.jsonl --limit 600 --out /tmp/distilled.jsonl \\
        [--mix 600] [eval-assistant's sampling flags: --temperature 0.7 --best-of 4 --word-reach 1 ...]
    slm finetune RUN --data /tmp/distilled.jsonl --val-data RUN/prompts.jsonl --out RUN-rft --max-minutes 3

Kept: every constraint met (constraints.check all 1), no repeated sentence, no glued or mis-cased word, ended
by itself, and the requested words' mean loss under RUN/pretrain at most --max-word-loss nats (the gold
stories' is about 3.6 on the dev prompts). --mix adds that many of the requests' own conversations after
them, so that the fine-tune does not drift to the model's own style alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from slm.assistant import following
from slm.assistant.constraints import check, flaws
from slm.assistant.evaluate import answer_prompts
from slm.data.tokenizer import get_tokenizer
from slm.inference.sampling import SamplingSettings, make_generator
from slm.runs.checkpoint import checkpoint_dir, load_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--requests", required=True, help="a chat.jsonl of story requests with their constraints")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--limit", type=int, default=600, help="requests answered (the file's first)")
    p.add_argument("--mix", type=int, default=0, help="original conversations added (those after the limit)")
    p.add_argument("--max-word-loss", type=float, default=5.0)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--word-bias", type=float, default=8.0)
    p.add_argument("--word-reach", type=float, default=1.0)
    p.add_argument("--dry-multiplier", type=float, default=0.8)
    p.add_argument("--best-of", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=16)
    args = p.parse_args()
    start = time.monotonic()
    rows = [json.loads(line) for line in Path(args.requests).read_text(encoding="utf-8").splitlines() if line.strip()]
    stories = [i for i, row in enumerate(rows) if row.get("kind") == "story" and row.get("constraints")][:args.limit]
    asked = [(rows[i], rows[i]["messages"][:-1]) for i in stories]
    model, _, _ = load_model(checkpoint_dir(args.run, "best"))
    fluency, _, _ = load_model(checkpoint_dir(Path(args.run) / "pretrain", "best"))
    settings = SamplingSettings(args.temperature, None, args.top_p, args.repetition_penalty, word_bias=args.word_bias,
                                word_reach=args.word_reach, dry_multiplier=args.dry_multiplier, best_of=args.best_of)
    answers = answer_prompts(model, asked, settings, make_generator(torch.device("cpu"), 0), args.micro_batch_size)
    reads = following.surprise(fluency, get_tokenizer(), [text for text, _ in answers])
    kept = []
    for (row, conversation), (text, ended), read in zip(asked, answers, reads):
        constraints = row["constraints"]
        word_loss = read.word_loss(constraints.get("words", [])) or 0.0
        if (ended and all(v == 1 for v in check(constraints, text).values())
                and not any(flaws(constraints, text)[k] for k in ("repeats", "glued", "miscased"))
                and word_loss <= args.max_word_loss):
            kept.append({**row, "messages": [*conversation, {"role": "assistant", "content": text}]})
    mixed = rows[stories[-1] + 1:][:args.mix]
    args.out.write_text("".join(json.dumps(r) + "\n" for r in kept + mixed), encoding="utf-8")
    print(f"{len(kept)} of {len(asked)} answers kept, {len(mixed)} originals mixed in, "
          f"{time.monotonic() - start:.0f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
