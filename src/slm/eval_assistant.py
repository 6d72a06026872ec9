"""`slm eval-assistant`: how well runs follow the held-out prompts of `slm make-instructions`, side by side.

Three scores, each one a reader can check by hand in the answers:
    words  the mean share of the requested words ("... uses the words A, B and C") the answer uses, as whole
           words ignoring case: does the model follow what the instruction asks for?
    name   the share of "What is the name of the main character in this story?" answered with exactly the
           name (surrounding punctuation aside): reading the story in the prompt, and answering the question
           instead of going on with a story, which a base model tends to do.
    ended  the share of answers that ended with end-of-text within --max-new-tokens: does it end its turn?
Answers are greedy by default (--temperature 0), so the scores belong to the checkpoint, not to luck; prompts
are decoded --batch-size at a time (generate.complete pads each batch, so a row gets the ids it would alone).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from slm.chat import Message, check_messages, prompt_ids
from slm.checkpoint import checkpoint_dir, load_model
from slm.device import pick_device, pick_dtype
from slm.errors import SlmError
from slm.generate import SamplingSettings, complete, make_generator
from slm.instructions import EVAL_KINDS, uses_word
from slm.tokenizer import get_tokenizer

SCORES = ("words", "name", "ended")


def words_score(answer: str, words: list[str]) -> float:
    return sum(uses_word(answer, word) for word in words) / len(words)


def name_score(answer: str, name: str) -> float:
    return float(answer.strip().strip(".!?\"'").strip().casefold() == name.casefold())


def read_prompts(path: str | Path) -> list[tuple[dict[str, Any], list[Message]]]:
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
        if not isinstance(row, dict) or row.get("kind") not in EVAL_KINDS:
            raise SlmError(f"{where}: \"kind\" must be one of {', '.join(EVAL_KINDS)}, the prompts this command scores")
        if row["kind"] == "words" and not (isinstance(row.get("words"), list) and row["words"]
                                           and all(isinstance(w, str) for w in row["words"])):
            raise SlmError(f"{where}: a words prompt needs \"words\", a list of the requested words")
        if row["kind"] == "name" and not isinstance(row.get("name"), str):
            raise SlmError(f"{where}: a name prompt needs \"name\", the expected answer")
        messages = check_messages(row.get("messages"), where)
        conversation = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        if not conversation:
            raise SlmError(f"{where}: the messages hold only the reference answer, no question")
        prompts.append((row, conversation))
    if not prompts:
        raise SlmError(f"{path} holds no prompts")
    return prompts


def score_run(folder: Path, prompts: list[tuple[dict[str, Any], list[Message]]], device: torch.device,
              settings: SamplingSettings, seed: int, batch_size: int,
              dtype: torch.dtype = torch.float32) -> dict[str, float | None]:
    """Each score of one checkpoint over the prompts (None for a kind the prompts do not have)."""
    model, cfg, _ = load_model(folder, device, dtype)
    settings.check(cfg.model.vocab_size)
    generator = make_generator(device, seed)
    results: dict[str, list[float]] = {score: [] for score in SCORES}
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        answers = complete(model, get_tokenizer(), [prompt_ids(conversation) for _, conversation in batch],
                           settings, generator)
        for (row, _), answer in zip(batch, answers):
            if row["kind"] == "words":
                results["words"].append(words_score(answer.text, row["words"]))
            else:
                results["name"].append(name_score(answer.text, row["name"]))
            results["ended"].append(float(answer.finish_reason == "stop"))  # end-of-text: no stop strings are set
    return {score: sum(values) / len(values) if values else None for score, values in results.items()}


def table(results: list[dict[str, Any]]) -> str:
    width = max(len("run"), *(len(r["run"]) for r in results))
    lines = [f"{'run':<{width}}  " + "  ".join(f"{score:>6}" for score in SCORES)]
    for r in results:
        lines.append(f"{r['run']:<{width}}  " + "  ".join("     -" if r[score] is None else f"{r[score]:6.3f}"
                                                          for score in SCORES))
    return "\n".join(lines)


def main(args) -> int:
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise SlmError(f"{flag} must be at least 1 (got {value})")
    folders = [checkpoint_dir(run, args.checkpoint) for run in args.runs]  # a wrong run fails before any work
    prompts = read_prompts(args.prompts)[:args.limit]
    device = pick_device(args.device)
    settings = SamplingSettings(args.temperature, args.top_k, max_new_tokens=args.max_new_tokens)
    results = []
    for run, folder in zip(args.runs, folders):
        scores = score_run(folder, prompts, device, settings, args.seed, args.batch_size,
                           pick_dtype(args.dtype, device))
        results.append({"run": str(run), "checkpoint": str(folder), **scores})
    counts = {kind: sum(row["kind"] == kind for row, _ in prompts) for kind in EVAL_KINDS}
    if args.json:
        print(json.dumps({"prompts": str(args.prompts), "counts": counts, "results": results}))
    else:
        how = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}, seed {args.seed}"
        print(f"{args.prompts}: {', '.join(f'{n} {kind}' for kind, n in counts.items())} prompts; {how}, "
              f"up to {args.max_new_tokens} new tokens", file=sys.stderr)
        print(table(results))
    return 0
