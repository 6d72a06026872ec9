"""`slm make-instructions`: chat data made from a story corpus alone, no other model involved.

Each story gives one conversation whose answer the story itself guarantees (slm.data.requests builds the
requests):

    story      a request the story satisfies: a character, words to use, the first or last sentence,
               dialogue or none, short or long, alone or together          -> the story
    continue   "Continue this story: FIRST SENTENCES"                      -> the rest of the story
    who        "STORY\n\nWho is the main character?"                        -> NAME
    follow_up  a request answered by another story of the same character, then "Again, but it uses the
               words A and B"                                              -> this story

Every part of a request has many phrasings, of which the last few (requests.HELD_OUT) never appear in
training rows. With --epochs E each story gives E rows, each with fresh random choices, so the model cannot
learn one pairing of a story and its request. Choices come from a generator seeded with (seed, epoch, story
index), so the output depends only on the corpus and --seed. Held-out stories (the source's validation split
when it has one, else --held-out of its stories) become the story prompts `slm eval-assistant` scores, half
of them in seen wordings and half in held-out ones, each with its constraints and reference story.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

from slm.data.prepare import held_out, open_source
from slm.data.requests import main_character, phrasings, story_facts, story_request, word_list
from slm.errors import SlmError
from slm.runs.files import atomic_path

KINDS = ("story", "continue", "who", "follow_up")
KIND_WEIGHTS = (6, 1, 1, 2)


def _conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def story_row(story: str, rng: random.Random, wording: str = "seen", earlier: str | None = None,
              kinds: tuple[str, ...] = KINDS) -> dict[str, Any] | None:
    """One conversation of a kind drawn (by KIND_WEIGHTS) from those the story allows; "story" rows carry
    their constraints and "wording". `earlier` is another story with the same main character, for a follow-up.
    None when the story allows none of `kinds`."""
    facts = story_facts(story)
    allowed = {"story": True, "continue": len(facts.sentences) >= 3, "who": facts.name is not None,
               "follow_up": earlier is not None and len(facts.words) >= 2}
    choices = [(kind, weight) for kind, weight in zip(KINDS, KIND_WEIGHTS) if kind in kinds and allowed[kind]]
    if not choices:
        return None
    kind = rng.choices([k for k, _ in choices], [w for _, w in choices])[0]
    pick = lambda part: rng.choice(phrasings(part, wording))  # noqa: E731
    row: dict[str, Any] = {"kind": kind}
    if kind == "story":
        made = story_request(facts, rng, wording)
        if made is None:
            return None
        question, row["constraints"] = made
        row["wording"] = wording
        row["messages"] = _conversation(question, story)
    elif kind == "continue":
        cut = rng.randrange(1, min(4, len(facts.sentences) - 1))
        row["messages"] = _conversation(pick("continue").format(text=" ".join(facts.sentences[:cut])),
                                        " ".join(facts.sentences[cut:]))
    elif kind == "who":
        row["constraints"] = {"name": facts.name}
        row["messages"] = _conversation(f"{story}\n\n{pick('who')}", facts.name)
    else:
        words = rng.sample(facts.words, rng.choice([1, 2, 2, 3]))
        row["constraints"] = {"name": facts.name, "words": words}
        first = f"{pick('ask')}{pick('about').format(name=facts.name)}."
        then = pick("follow_up").format(clause=f"uses the words {word_list(words, rng)}.")
        row["messages"] = [*_conversation(first, earlier), *_conversation(then, story)]
    return row


def held_out_rule(value: float, seed: int) -> Callable[[int], bool]:
    """--held-out: a fraction below 1 holds out that share of the stories, by a hash of (seed, index) as
    `slm prepare` does; a whole number N >= 1 holds out the first N stories."""
    if not (0 <= value < 1 or value == int(value) >= 1):
        raise SlmError(f"--held-out must be a fraction in [0, 1) or a whole number of stories (got {value:g})")
    if value < 1:
        return lambda index: value > 0 and held_out(seed, index, value)
    return lambda index: index < value


def _check_out(path: Path, force: bool) -> None:
    if path.is_dir():
        raise SlmError(f"{path} is a folder; name the .jsonl file to write")
    if path.exists() and not force:
        raise SlmError(f"{path} already exists; pass --force to replace it")


def _open_atomic(stack: ExitStack, path: Path) -> TextIO:
    """A temporary file beside `path`, renamed onto it when `stack` closes without an error, removed otherwise."""
    tmp = stack.enter_context(atomic_path(path))
    return stack.enter_context(open(tmp, "w", encoding="utf-8", newline="\n"))


def make_instructions(source: str, out: str | Path, prompts_out: str | Path | None = None,
                      held_out_value: float = 0, seed: int = 1337, max_stories: int = 0,
                      text_field: str = "text", force: bool = False, epochs: int = 1,
                      max_prompts: int = 200) -> dict[str, Counter]:
    """Write `out` (training conversations, `epochs` per story) and `prompts_out` (story prompts from held-out
    stories: the source's validation split if it has one, else --held-out of its stories; at most
    max_prompts); returns the kinds written."""
    out = Path(out)
    targets = [out] + ([Path(prompts_out)] if prompts_out else [])
    if prompts_out and out.resolve() == Path(prompts_out).resolve():
        raise SlmError("--out and --prompts-out must be different files")
    if max_stories < 0:
        raise SlmError(f"--max-stories must be 0 (all) or more (got {max_stories})")
    if epochs < 1:
        raise SlmError(f"--epochs must be at least 1 (got {epochs})")
    for path in targets:
        _check_out(path, force or path != out)  # an existing prompts file is judged below, once it is written
    is_held_out = held_out_rule(held_out_value, seed)
    counts = {"train": Counter(), "held_out": Counter()}
    with ExitStack() as stack:
        files = [_open_atomic(stack, path) for path in targets]
        for epoch in range(epochs):
            _, splits = open_source(source, text_field)  # again each epoch: sources stream
            held = list(islice(splits.get("validation", []), max_prompts)) if prompts_out and epoch == 0 else []
            earlier: dict[str, str] = {}  # the last training story of each main character, for follow-ups
            for index, story in enumerate(splits["train"]):
                if max_stories and index >= max_stories:
                    break
                if "validation" not in splits and is_held_out(index):
                    if prompts_out and epoch == 0:
                        held.append(story)
                    continue
                name = main_character(story)
                row = story_row(story, random.Random(f"{seed}:{epoch}:{index}"), "seen", earlier.get(name or ""))
                if name:
                    earlier[name] = story
                if row is not None:
                    files[0].write(json.dumps(row, ensure_ascii=False) + "\n")
                    counts["train"][row["kind"]] += 1
            for index, story in enumerate(held[:max_prompts]):
                wording = ("seen", "held_out")[index % 2]
                row = story_row(story, random.Random(f"{seed}:prompt:{index}"), wording, kinds=("story",))
                if row is not None:
                    files[1].write(json.dumps({**row, "index": index}, ensure_ascii=False) + "\n")
                    counts["held_out"][f"{row['kind']} ({wording} wording)"] += 1
        if not counts["train"]:
            raise SlmError(f"{source} gave no training conversations; it needs stories of a few sentences")
        if prompts_out and not counts["held_out"]:
            raise SlmError(f"{source} has no held-out stories for --prompts-out; raise --held-out")
        for file in files:
            file.flush()
            os.fsync(file.fileno())
        # --out is renamed last, so a kill between the two renames leaves the prompts file alone; a rerun may
        # put the same bytes back, but never replaces other prompts without --force.
        if prompts_out and not force and targets[1].exists() and not filecmp.cmp(files[1].name, targets[1], False):
            raise SlmError(f"{targets[1]} already exists with other prompts; pass --force to replace it")
    for part, path in zip(("train", "held_out"), targets):
        kinds = ", ".join(f"{kind} {n:,}" for kind, n in sorted(counts[part].items()))
        print(f"wrote {sum(counts[part].values()):,} conversations to {path} ({kinds})", file=sys.stderr)
    return counts


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="demo, tinystories, hf:NAME[:CONFIG], or a .txt/.jsonl/.parquet file or folder")
    p.add_argument("--out", required=True, help="the .jsonl file of training conversations to write")
    p.add_argument("--prompts-out", metavar="FILE", help="also write held-out prompts, for `slm eval-assistant`")
    p.add_argument("--held-out", type=float, default=None, metavar="N|FRACTION",
                   help="where the source has no validation split: training stories held out for --prompts-out, "
                        "the first N or a fraction (default: 100)")
    p.add_argument("--epochs", type=int, default=1,
                   help="conversations per training story, each with fresh random choices (default: 1)")
    p.add_argument("--max-stories", type=int, default=0, help="read at most this many stories (default: 0, all)")
    p.add_argument("--text-field", default="text", help="field holding the text in JSONL/parquet/HF rows")
    p.add_argument("--seed", type=int, default=1337, help="seed of the instruction kinds and word choices")
    p.add_argument("--force", action="store_true", help="replace existing output files")


def main(args) -> int:
    held = args.held_out if args.held_out is not None else 100
    make_instructions(args.source, args.out, args.prompts_out, held, args.seed, args.max_stories,
                      args.text_field, args.force, args.epochs)
    return 0
