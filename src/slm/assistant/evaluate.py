"""`slm eval-assistant`: how well runs follow held-out story requests, side by side.

The prompts come from `slm make-instructions --prompts-out`: requests made from stories no training saw,
half in wordings training used and half in wordings it never used (requests.HELD_OUT). Each answer is
scored by constraints.check, the checker in the words the requests were made in, and by what makes it a story:

    words     mean share of the requested words the answer uses (whole words, any case)
    name      share of answers that name the requested character
    starts, ends, dialogue, length    share of answers that start / end with the given sentence, have
              dialogue or none as asked, are as short or long as asked
    story     share of answers that are prose (30+ words in 3+ sentences), not a word list
    ended     share of answers that ended by themselves (end-of-text) within --max-new-tokens
    n_words   mean answer length in words
    distinct4 mean share of distinct word 4-grams within an answer: 1 is no repetition, low is a loop
    all_words share of answers that use every requested word
    repeats   share of answers that repeat a sentence of 3+ words
    glued, miscased   share of answers with a requested word glued to the next or previous word
              ("aTogether"), or in the wrong case (a name in lower case, a word capitalized mid-sentence)
    first_words       mean number of requested words in the answer's first sentence
    loss      mean loss per token of the answer as a plain story under --fluency-run (default: the first
              run's pretrain/ folder where it has one, else the first run)
    spiky     share of answers whose most surprising word (the highest loss over a word's tokens) is above the
              95th percentile of the reference stories' most surprising words: a forced word is such a spike
    word_loss mean loss of the requested words where the answer first writes each (the gold line: where a
              person wrote them); a word forced in where it does not fit costs far more

The reference stories (each prompt's own) are scored too, as the line "gold", so that every figure has
what a human-written story gets. Answers are made as `slm chat` and `slm serve` make them (slm.assistant.following):
the request is read from its text, a requested first sentence starts the answer, a requested last sentence
ends it, and with --best-of N the best of N candidates is kept.

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

from slm.assistant import following
from slm.assistant.constraints import check, distinct_4grams, flaws, is_story, word_count
from slm.config import add_checkpoint_choice, add_placement
from slm.data.template import Message, check_messages, conversation_ids, fit_for_answer, jsonl_rows
from slm.data.tokenizer import get_tokenizer
from slm.device import pick_device, pick_dtype
from slm.errors import SlmError
from slm.inference.sampling import DEFAULT_MAX_NEW_TOKENS, FLAGS, SamplingSettings, add_sampling_flags, make_generator
from slm.runs.checkpoint import checkpoint_dir, load_model
from slm.runs.files import write_text_atomic

CONSTRAINTS = ("words", "name", "starts", "ends", "dialogue", "length")
SCORES = (*CONSTRAINTS, "all_words", "story", "ended", "n_words", "distinct4", "repeats", "glued", "miscased",
          "first_words", "loss", "spiky", "word_loss")
WORDINGS = ("all", "seen", "held_out")
Prompt = tuple[dict[str, Any], list[Message]]


def read_prompts(path: str | Path) -> list[Prompt]:
    """(row, conversation to answer) for each row; a final assistant message is the reference answer and
    is left out of the conversation."""
    path = Path(path)
    prompts = []
    for where, row in jsonl_rows(path, f"--prompts file {path} does not exist; write one with `slm make-instructions "
                                 f"SOURCE --out chat.jsonl --prompts-out {path}`"):
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
    """Every score of one answer but fluency's: each constraint's (constraints.check), what makes it a
    story, and its flaws (constraints.flaws)."""
    scores = {**check(constraints, answer), "story": float(is_story(answer)), "ended": float(ended),
              "n_words": float(word_count(answer)), "distinct4": distinct_4grams(answer), **flaws(constraints, answer)}
    if "words" in constraints:
        scores["all_words"] = float(scores["words"] == 1)
    return scores


def add_fluency(scored: list[dict[str, float]], gold: list[float], surprises: list[following.Surprise],
                constraints: list[dict[str, Any]]) -> None:
    """Each answer's mean loss, whether its spike passes the 95th percentile of the gold spikes, and the mean
    loss of its requested words where it writes them."""
    threshold = sorted(gold)[min(len(gold) - 1, int(0.95 * len(gold)))] if gold else float("inf")
    for scores, read, asked in zip(scored, surprises, constraints):
        scores["loss"], scores["spiky"] = read.mean_loss, float(read.spike > threshold)
        if (word_loss := read.word_loss(asked.get("words", []))) is not None:
            scores["word_loss"] = word_loss


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
    """(answer text, ended by itself) for each prompt, batch_size prompts at a time (each best_of rows)."""
    answers, tokenizer = [], get_tokenizer()
    for start in range(0, len(prompts), batch_size):
        batch = [fit_for_answer(conversation, model.config.block_size, settings.max_new_tokens)
                 for _, conversation in prompts[start:start + batch_size]]
        plans = [following.plan(tokenizer, conversation) for conversation in batch]
        done = following.answers(model, tokenizer, [conversation_ids(c) for c in batch], plans, settings, generator)
        answers += [(a.text, a.finish_reason == "stop") for a in done]  # no stop strings: stop is end-of-text
    return answers


def reference(row: dict[str, Any]) -> str | None:
    """The prompt's own story, the last assistant message of its row, if it has one."""
    last = row.get("messages", [{}])[-1]
    return last.get("content") if isinstance(last, dict) and last.get("role") == "assistant" else None


def score_run(folder: Path, prompts: list[Prompt], device: torch.device, settings: SamplingSettings, seed: int,
              batch_size: int, dtype: torch.dtype = torch.float32,
              fluency: torch.nn.Module | None = None,
              gold_spikes: list[float] = ()) -> tuple[dict[str, Any], list[str]]:
    """(scores per wording, answers) of one checkpoint over the prompts; with a `fluency` model, also each
    answer's loss and whether its spike passes the reference stories' (`gold_spikes`, score_gold's)."""
    model, cfg, _ = load_model(folder, device, dtype)
    settings.check(cfg.model.vocab_size)
    answers = answer_prompts(model, prompts, settings, make_generator(device, seed), batch_size)
    texts = [text for text, _ in answers]
    scored = [answer_scores(row["constraints"], text, ended) for (row, _), (text, ended) in zip(prompts, answers)]
    if fluency is not None:
        add_fluency(scored, list(gold_spikes), following.surprise(fluency, get_tokenizer(), texts),
                    [row["constraints"] for row, _ in prompts])
    return summarize([(row.get("wording", "seen"), s) for (row, _), s in zip(prompts, scored)]), texts


def score_gold(prompts: list[Prompt], fluency: torch.nn.Module) -> tuple[dict[str, Any], list[float]]:
    """The reference stories' own scores, as if each were the answer to its prompt, and each one's spike."""
    rows = [(row, story) for row, _ in prompts if (story := reference(row))]
    tokenizer = get_tokenizer()
    surprises = following.surprise(fluency, tokenizer, [story for _, story in rows])
    scored = [answer_scores(row["constraints"], story, True) for row, story in rows]
    spikes = [read.spike for read in surprises]
    add_fluency(scored, spikes, surprises, [row["constraints"] for row, _ in rows])
    return summarize([(row.get("wording", "seen"), s) for (row, _), s in zip(rows, scored)]), spikes


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
    add_sampling_flags(p, {"top_k": None, "top_p": 1, "repetition_penalty": 1, "word_bias": 0, "word_reach": 0,
                           "dry_multiplier": 0, "best_of": 1})
    p.add_argument("--fluency-run", default=None, metavar="RUN", help="the model whose surprise scores fluency "
                   "(default: the first run's pretrain/ folder where it has one, else the first run)")
    p.add_argument("--answers-out", default=None, metavar="FILE",
                   help="also write every answer, with its request and scores, as JSONL")
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
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, **{key: getattr(args, key) for key in FLAGS})
    dtype = pick_dtype(args.dtype, device)
    fluency_run = args.fluency_run or next((str(p) for p in [Path(args.runs[0]) / "pretrain"] if p.is_dir()),
                                           args.runs[0])
    fluency, _, _ = load_model(checkpoint_dir(fluency_run, args.checkpoint), device, dtype)
    gold, gold_spikes = score_gold(prompts, fluency)
    results = [{"run": "gold", "checkpoint": None, "scores": gold}]
    written = []
    for run, folder in zip(args.runs, folders):
        scores, answers = score_run(folder, prompts, device, settings, args.seed, args.micro_batch_size, dtype,
                                    fluency, gold_spikes)
        results.append({"run": str(run), "checkpoint": str(folder), "scores": scores})
        written += [{"run": str(run), "index": i, "request": conversation[-1]["content"], "answer": answer,
                     "constraints": row["constraints"]} for i, ((row, conversation), answer)
                    in enumerate(zip(prompts, answers))]
        if args.show:
            for (_, conversation), answer in zip(prompts[:args.show], answers):
                print(f"--- {run}: {conversation[-1]['content']}\n{answer.strip()}\n", file=sys.stderr)
    if args.answers_out:
        write_text_atomic(Path(args.answers_out), "".join(json.dumps(row) + "\n" for row in written))
    counts = {w: sum(row.get("wording", "seen") == w for row, _ in prompts) for w in WORDINGS[1:]}
    if args.json:
        print(json.dumps({"prompts": str(args.prompts), "counts": counts, "results": results}))
    else:
        how = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}, seed {args.seed}"
        print(f"{args.prompts}: {counts['seen']} prompts in seen wordings, {counts['held_out']} in held-out ones; "
              f"{how}, best of {args.best_of}, up to {args.max_new_tokens} new tokens; fluency by {fluency_run}",
              file=sys.stderr)
        print(table(results))
    return 0
