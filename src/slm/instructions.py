"""`slm make-instructions`: chat data made from a story corpus alone, no other model involved.

Each story gives one conversation whose answer the story itself guarantees:

    words     "Write a story about NAME that uses the words A, B and C."  -> the story (A, B, C are its words)
    continue  "Continue this story: FIRST SENTENCES"                      -> the rest of the story
    starts    "Write a story that starts with: FIRST SENTENCE"            -> the story
    name      "STORY\\n\\nWhat is the name of the main character in this story?" -> NAME

The question follows the story so that, when a story is longer than the context, the window that holds
the answer still holds the question. NAME is the first "named X" / "name was X" of the story, else its most
frequent capitalized word that does not start a sentence (seen at least twice); a story without one gets
no name question and an unnamed words prompt. The kind is drawn by a generator seeded with (seed, story
index), so the output depends only on the corpus and --seed. A held-out part of the corpus, disjoint from the
training rows, becomes the "words" and "name" prompts that `slm eval-assistant` scores, each row with its
reference answer (so it also serves as `slm finetune --val-data`).
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TextIO

from slm.errors import SlmError
from slm.prepare import held_out, open_source

KINDS = ("words", "continue", "starts", "name")
EVAL_KINDS = ("words", "name")
NAME_QUESTION = "What is the name of the main character in this story?"
_NAMED = re.compile(r"\b(?:named|name was|name is) ([A-Z][a-z]+)\b")
_CAPITALIZED = re.compile(r"\b[A-Z][a-z]+\b")
# Capitalized words that are not names, or not the main character's (grown-ups are named by their role).
_NOT_NAMES = frozenset("I Mom Mommy Dad Daddy Mama Papa Grandma Grandpa Granny Mr Mrs Miss Sir Mister Aunt Uncle "
                       "Teacher God Santa Christmas Monday Sunday The Once One".split())
# A sentence ends at . ! or ? (and a closing quote) before a capital letter or an opening quote.
_SENTENCE_END = re.compile(r'[.!?]["\u201d]?(?=\s+["\u201cA-Z])')
# Lower-case words of 4+ letters, not part of a contraction: candidates for "uses the words".
_WORD = re.compile(r"(?<![\w'])[a-z]{4,}(?![\w'])")
_STOPWORDS = frozenset("""about after again also always another around away back because been before being
best both came come could didn does doing done down each even ever every from gave give going gone good have
here into just know like little look made make many more most much must next once only other over said same
saying says should some something soon still such sure take than that their them then there these they thing
things this those through time told took upon very want wanted wants well went were what when where which while
will with would your""".split())


def main_character(story: str) -> str | None:
    """The name of the story's main character, or None when it names none (see the module docstring)."""
    named = _NAMED.search(story)
    if named and named.group(1) not in _NOT_NAMES:
        return named.group(1)
    counts: Counter[str] = Counter()
    for match in _CAPITALIZED.finditer(story):
        before = story[:match.start()].rstrip()
        if match.group() not in _NOT_NAMES and before and before[-1] not in '.!?"\u201c:':
            counts[match.group()] += 1
    name, count = counts.most_common(1)[0] if counts else (None, 0)
    return name if count >= 2 else None


def uses_word(text: str, word: str) -> bool:
    """Whether `word` occurs in text as a whole word, ignoring case."""
    return re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) is not None


def words_prompt(name: str | None, words: list[str]) -> str:
    about = f" about {name}" if name else ""
    return f"Write a story{about} that uses the words {', '.join(words[:-1])} and {words[-1]}."


def story_row(story: str, rng: random.Random, kinds: tuple[str, ...] = KINDS) -> dict[str, Any] | None:
    """One conversation of a kind drawn from those the story allows, with the facts to score it by;
    None when the story allows none of `kinds`."""
    name = main_character(story)
    words = list(dict.fromkeys(w for w in _WORD.findall(story) if w not in _STOPWORDS and w != (name or "").lower()))
    cuts = [m.end() for m in _SENTENCE_END.finditer(story)]
    allowed = {"words": len(words) >= 3, "continue": len(cuts) >= 2, "starts": len(cuts) >= 1, "name": name is not None}
    choices = [kind for kind in kinds if allowed[kind]]
    if not choices:
        return None
    kind = rng.choice(choices)
    row: dict[str, Any] = {"kind": kind}
    if kind == "words":
        row["words"] = rng.sample(words, 3)
        row["name"] = name
        question, answer = words_prompt(name, row["words"]), story
    elif kind == "continue":
        cut = cuts[rng.randrange(min(3, len(cuts) - 1))]
        question, answer = f"Continue this story: {story[:cut]}", story[cut:].strip()
    elif kind == "starts":
        question, answer = f"Write a story that starts with: {story[:cuts[0]]}", story
    else:
        row["name"] = name
        question, answer = f"{story}\n\n{NAME_QUESTION}", name
    row["messages"] = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
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
    """A temporary file beside `path`, renamed onto it by _commit; removed if anything fails first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    stack.callback(lambda: tmp.unlink(missing_ok=True))
    return stack.enter_context(open(tmp, "w", encoding="utf-8", newline="\n"))


def _commit(file: TextIO, path: Path) -> None:
    file.flush()
    os.fsync(file.fileno())
    file.close()
    os.replace(file.name, path)


def make_instructions(source: str, out: str | Path, prompts_out: str | Path | None = None,
                      held_out_value: float = 0, seed: int = 1337, max_stories: int = 0,
                      text_field: str = "text", force: bool = False) -> dict[str, Counter]:
    """Write `out` (training conversations) and `prompts_out` (held-out prompts); returns the kinds written."""
    out = Path(out)
    targets = [out] + ([Path(prompts_out)] if prompts_out else [])
    if prompts_out and out.resolve() == Path(prompts_out).resolve():
        raise SlmError("--out and --prompts-out must be different files")
    if held_out_value and not prompts_out:
        raise SlmError("--held-out needs --prompts-out FILE for the held-out prompts")
    if max_stories < 0:
        raise SlmError(f"--max-stories must be 0 (all) or more (got {max_stories})")
    for path in targets:
        _check_out(path, force)
    is_held_out = held_out_rule(held_out_value, seed)
    _, splits = open_source(source, text_field)
    counts = {"train": Counter(), "held_out": Counter()}
    with ExitStack() as stack:
        files = [_open_atomic(stack, path) for path in targets]
        for index, story in enumerate(splits["train"]):
            if max_stories and index >= max_stories:
                break
            part = "held_out" if is_held_out(index) else "train"
            row = story_row(story, random.Random(f"{seed}:{index}"), EVAL_KINDS if part == "held_out" else KINDS)
            if row is not None:
                files[part == "held_out"].write(json.dumps(row, ensure_ascii=False) + "\n")
                counts[part][row["kind"]] += 1
        if not counts["train"]:
            raise SlmError(f"{source} gave no training conversations; it needs stories of a few sentences")
        if prompts_out and not counts["held_out"]:
            raise SlmError(f"--held-out {held_out_value:g} held out no usable story; raise it")
        for file, path in zip(files, targets):
            _commit(file, path)
    for part, path in zip(("train", "held_out"), targets):
        kinds = ", ".join(f"{kind} {n:,}" for kind, n in sorted(counts[part].items()))
        print(f"wrote {sum(counts[part].values()):,} conversations to {path} ({kinds})", file=sys.stderr)
    return counts


def main(args) -> int:
    held = args.held_out if args.held_out is not None else (100 if args.prompts_out else 0)
    make_instructions(args.source, args.out, args.prompts_out, held, args.seed, args.max_stories,
                      args.text_field, args.force)
    return 0
