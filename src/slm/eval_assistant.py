"""`slm eval-assistant`: how well runs follow held-out story requests, side by side.

The prompts come from `slm make-instructions --prompts-out`: requests made from stories no training saw,
half in wordings training used and half in wordings it never used (constraints.HELD_OUT). Each answer is
scored by constraints.check, the checker that also built the requests, and by what makes it a story:

    words     mean share of the requested words the answer uses (whole words, any case)
    name      share of answers that name the requested character
    starts, ends, dialogue, length    share of answers that start / end with the given sentence, have
              dialogue or none as asked, are as short or long as asked
    story     share of answers that are prose (30+ words in 3+ sentences), not a word list
    ended     share of answers that ended by themselves (end-of-text) within --max-new-tokens
    n_words   mean answer length in words
    distinct4 mean share of distinct word 4-grams within an answer: 1 is no repetition, low is a loop

Each score is reported over all prompts and apart for seen and held-out wordings. Answers are greedy by
default (--temperature 0), so the scores belong to the checkpoint, not to luck.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from slm.chat import Message, check_messages, conversation_ids, request_words_of
from slm.checkpoint import checkpoint_dir, load_model
from slm.config import add_checkpoint_choice, add_placement
from slm.constraints import check, distinct_4grams, is_story, word_count, word_first_ids
from slm.device import pick_device, pick_dtype
from slm.errors import SlmError
from slm.batching import complete
from slm.sampling import DEFAULT_MAX_NEW_TOKENS, SamplingSettings, make_generator
from slm.tokenizer import get_tokenizer

CONSTRAINTS = ("words", "name", "starts", "ends", "dialogue", "length")
SCORES = (*CONSTRAINTS, "story", "ended", "n_words", "distinct4")
WORDINGS = ("all", "seen", "held_out")
Prompt = tuple[dict[str, Any], list[Message]]


def read_prompts(path: str | Path) -> list[Prompt]:
    """(row, conversation to answer) for each row; a final assistant message is the reference answer and
    is left out of the conversation."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SlmError(f"--prompts file {path} does not exist; write one with `slm make-instructions "
                       f"SOURCE --out chat.jsonl --prompts-out {path}`") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SlmError(f"{where} is not JSON ({err.msg})") from None
        constraints = row.get("constraints") if isinstance(row, dict) else None
        if not isinstance(constraints, dict) or not constraints or not set(constraints) <= set(CONSTRAINTS):
            raise SlmError(f"{where}: \"constraints\" must be an object with some of {', '.join(CONSTRAINTS)}")
        if "words" in constraints and not (isinstance(constraints["words"], list) and constraints["words"]
                                           and all(isinstance(w, str) for w in constraints["words"])):
            raise SlmError(f"{where}: \"words\" must be a non-empty list of the requested words")
        messages = check_messages(row.get("messages"), where)
        conversation = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        if not conversation:
            raise SlmError(f"{where}: the messages hold only the reference answer, no question")
        prompts.append((row, conversation))
    if not prompts:
        raise SlmError(f"{path} holds no prompts")
    return prompts


def answer_scores(constraints: dict[str, Any], answer: str, ended: bool) -> dict[str, float]:
    """Every score of one answer: each constraint's (constraints.check), then what makes it a story."""
    return {**check(constraints, answer), "story": float(is_story(answer)), "ended": float(ended),
            "n_words": float(word_count(answer)), "distinct4": distinct_4grams(answer)}


def summarize(scored: list[tuple[str, dict[str, float]]]) -> dict[str, dict[str, float | None]]:
    """Mean of each score over the answers that have it, per wording ("all", "seen", "held_out")."""
    values: dict[str, dict[str, list[float]]] = {w: defaultdict(list) for w in WORDINGS}
    for wording, scores in scored:
        for key, value in scores.items():
            values["all"][key].append(value)
            if wording in values:
                values[wording][key].append(value)
    return {w: {s: sum(v[s]) / len(v[s]) if v[s] else None for s in SCORES} for w, v in values.items()}


def answer_prompts(model: torch.nn.Module, prompts: list[Prompt], settings: SamplingSettings,
                   generator: torch.Generator | None, batch_size: int) -> list[tuple[str, bool]]:
    """(answer text, ended by itself) for each prompt, decoded batch_size at a time."""
    answers, tokenizer = [], get_tokenizer()
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        words = ([word_first_ids(tokenizer, request_words_of(conversation)) for _, conversation in batch]
                 if settings.word_bias else None)
        done = complete(model, tokenizer, [conversation_ids(conversation) for _, conversation in batch], settings,
                        generator, words)
        answers += [(a.text, a.finish_reason == "stop") for a in done]  # no stop strings: stop is end-of-text
    return answers


def score_run(folder: Path, prompts: list[Prompt], device: torch.device, settings: SamplingSettings, seed: int,
              batch_size: int, dtype: torch.dtype = torch.float32) -> tuple[dict[str, Any], list[str]]:
    """(scores per wording, answers) of one checkpoint over the prompts."""
    model, cfg, _ = load_model(folder, device, dtype)
    settings.check(cfg.model.vocab_size)
    answers = answer_prompts(model, prompts, settings, make_generator(device, seed), batch_size)
    scored = [(row.get("wording", "seen"), answer_scores(row["constraints"], text, ended))
              for (row, _), (text, ended) in zip(prompts, answers)]
    return summarize(scored), [text for text, _ in answers]


def table(results: list[dict[str, Any]]) -> str:
    """One line per run and wording; a dash where no prompt asked for that constraint."""
    width = max(len("run"), *(len(r["run"]) for r in results))
    lines = [f"{'run':<{width}}  {'wording':<8}  " + "  ".join(f"{s:>9}" for s in SCORES)]
    for r in results:
        for wording in WORDINGS:
            cells = []
            for score in SCORES:
                value = r["scores"][wording][score]
                digits = 1 if score == "n_words" else 3
                cells.append(f"{'-':>9}" if value is None else f"{value:9.{digits}f}")
            lines.append(f"{r['run']:<{width}}  {wording:<8}  " + "  ".join(cells))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders to compare, e.g. the base and the fine-tune")
    p.add_argument("--prompts", required=True, help="held-out prompts written by `slm make-instructions --prompts-out`")
    add_checkpoint_choice(p, run=None)
    add_placement(p)
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help="the most new tokens per answer (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; higher = more random (default: 0, "
                   "unlike generate and chat, so that the scores belong to the checkpoint, not to luck)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely ids")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample only among the most likely ids whose probability reaches p (default: 1, all)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="above 1, ids already in the prompt or the output get less likely (default: 1, none)")
    p.add_argument("--word-bias", type=float, default=0.0,
                   help="added to the logits of the words a request names until the answer uses each (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling when --temperature > 0 (default: 0)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N prompts")
    p.add_argument("--show", type=int, default=0, metavar="N", help="also print the first N answers of each run")
    p.add_argument("--micro-batch-size", type=int, default=8,
                   help="prompts decoded together: speed and memory, not scores (default: 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def main(args) -> int:
    for flag, value in (("--limit", args.limit), ("--micro-batch-size", args.micro_batch_size)):
        if value is not None and value < 1:
            raise SlmError(f"{flag} must be at least 1 (got {value})")
    folders = [checkpoint_dir(run, args.checkpoint) for run in args.runs]  # a wrong run fails before any work
    prompts = read_prompts(args.prompts)[:args.limit]
    device = pick_device(args.device)
    settings = SamplingSettings(args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                                max_new_tokens=args.max_new_tokens, word_bias=args.word_bias)
    results = []
    for run, folder in zip(args.runs, folders):
        scores, answers = score_run(folder, prompts, device, settings, args.seed, args.micro_batch_size,
                                    pick_dtype(args.dtype, device))
        results.append({"run": str(run), "checkpoint": str(folder), "scores": scores})
        if args.show:
            for (_, conversation), answer in zip(prompts[:args.show], answers):
                print(f"--- {run}: {conversation[-1]['content']}\n{answer.strip()}\n", file=sys.stderr)
    counts = {w: sum(row.get("wording", "seen") == w for row, _ in prompts) for w in WORDINGS[1:]}
    if args.json:
        print(json.dumps({"prompts": str(args.prompts), "counts": counts, "results": results}))
    else:
        how = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}, seed {args.seed}"
        print(f"{args.prompts}: {counts['seen']} prompts in seen wordings, {counts['held_out']} in held-out ones; "
              f"{how}, up to {args.max_new_tokens} new tokens", file=sys.stderr)
        print(table(results))
    return 0
