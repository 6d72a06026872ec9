"""A final check of an assistant on requests no choice was made on: other stories, other wordings.

    python benchmarks/assistant_check.py ../shared/data/tinystories-sample RUN [RUN ...] --out /tmp/check.jsonl \
        [eval-assistant flags: --temperature 0.7 --best-of 4 ...]
    python benchmarks/assistant_check.py ../shared/data/tinystories-sample --out /tmp/check.jsonl \
        --answers ANSWERS.jsonl --fluency-run RUN/pretrain   # score answers made elsewhere (an older slm)

The recipe and the sampling were chosen on requests made from the first 200 stories of valid.txt
(`slm make-instructions`' prompts). This check uses the stories after those, and wordings written here once,
in none of slm's phrasing lists, the way a person might ask. Each asks for the story's main character and
three of its words; a third also give the first sentence and a third the last one, in words of their own.
Each set was written before any answer to it was read and run once on a final recipe; its figures are
reported, never tuned on. Once its answers are read a set is spent (the reader may have been fixed on it) and
a new one is written: FREE_WORDINGS 2026-12-02, CHECK_WORDINGS 2026-12-06, FRESH_WORDINGS 2026-12-07 (read the
same day: the greedy figures missed the goal, and greedy best-of followed), LATER_WORDINGS after it (read:
the request reader was fixed on it), THIRD_WORDINGS after that, FOURTH_WORDINGS 2026-12-07 (prompt seed 4; spent:
the word reach was chosen after it) FIFTH_WORDINGS 2026-12-07 (prompt seed 5; spent: its
requests showed the request reader's misses) and SIXTH_WORDINGS 2026-12-07 (prompt seed 6).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

from slm.data.requests import story_facts, word_list

FREE_WORDINGS = [
    "hey can you make up a bedtime story for my kid? it should be about {name} and mention {words}",
    "I need a tale. Main character: {name}. Must include: {words}.",
    "{name} should be the hero of a little story. Put the words {words} in it somewhere.",
    "Story time! Character: {name}. Keywords: {words}.",
    "Please tell a story in which {name} appears, using {words}.",
    "Write something for children featuring {name}; required vocabulary: {words}.",
    "Could I get a tale with {words} in it, starring {name}?",
    "Once-upon-a-time story please. Use these: {words}. The one it is about is called {name}.",
]
CHECK_WORDINGS = [
    "my daughter wants a story tonight. the main kid is {name}, and she asked for {words} to be in it",
    "Short story for a 4 year old, please. It's about {name}. Try to use {words}.",
    "Tell a little story about a child named {name}. The words {words} need to show up.",
    "{name} goes on an adventure! Write it, and get {words} in there.",
    "Can u do a kids story w/ {name}? must have {words}",
    "I'm looking for a story where {name} is the main character and the words {words} are used.",
    "A gentle tale, please, about {name}; somewhere in it say {words}.",
    "Invent a story. Hero: {name}. It needs these three words: {words}.",
]
CHECK_STARTS = ['The very first line has to be "{sentence}"', "Use this as the opening sentence: {sentence}",
                'Begin it exactly like this: "{sentence}"', "First sentence: {sentence}"]
CHECK_ENDS = ['Wrap it up with "{sentence}"', "Its last sentence: {sentence}", 'Please end on: "{sentence}"',
              "Make this the closing line: {sentence}"]
FRESH_WORDINGS = [
    "Could you write me a kids' story? The hero is {name}. Please work in the words {words}.",
    "{name} is the star of tonight's bedtime story. Include {words}.",
    "write a story for my son about {name} using the words {words}",
    "I'd love a story with a character called {name}. It should contain {words}.",
    "Make up a fun story! {name} is in it, and so are the words {words}.",
    "Need a children's story asap. Name: {name}. Words to include: {words}",
    "Tell me a story starring {name} that uses {words}.",
    "Please create a simple story for a young reader about {name}, with {words} in it.",
]
FRESH_STARTS = ['Start the story with: "{sentence}"', "The opening line should be: {sentence}",
                'Kick it off with "{sentence}"', "Open with this sentence: {sentence}"]
FRESH_ENDS = ['Finish the story with "{sentence}"', "The final line should be: {sentence}",
              'End it like this: "{sentence}"', "Close with this sentence: {sentence}"]
LATER_WORDINGS = [
    "So my kid loves {name}. Can you do a story with them, and put {words} in it?",
    "Story please: {name} as the main character, words {words}",
    "Write a bedtime tale. The little one in it is named {name}; it has to say {words} somewhere.",
    "Hi! I want a happy story about {name}. Can it have {words}?",
    "{name} needs a story. Words: {words}.",
    "Give me a tale for kids where {name} does something fun. Use {words}, please.",
    "A story, not too scary, about {name}. Remember to use the words {words}.",
    "Could you tell a story for little kids? It should be about {name} and needs {words}.",
]
LATER_STARTS = ['Have it begin with "{sentence}"', "Use this first sentence: {sentence}",
                'The story should open like this: "{sentence}"', "Begin with these words: {sentence}"]
LATER_ENDS = ['Have it end with "{sentence}"', "Use this last sentence: {sentence}",
              'The story should finish like this: "{sentence}"', "The ending sentence must be: {sentence}"]
THIRD_WORDINGS = [
    "Can I get a story about {name}? Please use the words {words}.",
    "{name} is a kid in my class. Write a tale for them that has {words} in it.",
    "Bedtime story request: {name}, plus the words {words}.",
    "tell a story with {name} in it. include these: {words}",
    "Write a nice story. Main character = {name}. Words = {words}.",
    "Please, a story about {name}! It must use {words}.",
    "Could you make a children's story where {name} is the hero? Try to fit in {words}.",
    "I want to read my son a story about {name}, and it should mention {words}.",
]
THIRD_STARTS = ['It should start: "{sentence}"', "First line: {sentence}", 'Start with the sentence "{sentence}"',
                "The story begins: {sentence}"]
THIRD_ENDS = ['It should end: "{sentence}"', "Last line: {sentence}", 'End with the sentence "{sentence}"',
              "The story ends: {sentence}"]
FOURTH_WORDINGS = [
    "My niece loves {name}. Could you write her a short story using {words}?",
    "Story time! Hero: {name}. Make sure it has {words}.",
    "write something for kids about {name} -- words to use: {words}",
    "I need a little story starring {name}, with {words} somewhere in it.",
    "Give me a simple tale. The main kid is {name}; please work in {words}.",
    "Can you tell me a story? It's about {name} and uses {words}.",
    "A short story for a five-year-old, please, about {name}. Put {words} in it.",
    "Make up a story where {name} has an adventure, and use the words {words}.",
]
FOURTH_STARTS = ['Begin it with: "{sentence}"', "Opening sentence: {sentence}", 'Open with "{sentence}"']
FOURTH_ENDS = ['Finish it with: "{sentence}"', "Final sentence: {sentence}", 'Close with "{sentence}"']
FIFTH_WORDINGS = [
    "Hello! Please write a story about {name} for my little brother. Use {words}.",
    "could you do a short one about {name}? needs {words}",
    "Our class is reading about {name} today. Write us a story that includes {words}.",
    "Tonight's story should be about {name}, and I want to hear {words} in it.",
    "Kids' story. The main one is {name}. Words it must contain: {words}.",
    "Please invent a happy little story about {name} that has the words {words}.",
    "I'd like a story where {name} learns something. Be sure to use {words}.",
    "Write a tale for small children. Star: {name}. Use: {words}.",
]
FIFTH_STARTS = ['The first sentence must be "{sentence}"', "Start like this: {sentence}",
                'Let it begin: "{sentence}"']
FIFTH_ENDS = ['The last sentence must be "{sentence}"', "End like this: {sentence}", 'Let it end: "{sentence}"']
SIXTH_WORDINGS = [
    "Can you write a story for me about {name}? I'd like it to have {words}.",
    "bedtime story pls!! about {name}. use {words}",
    "Write a story in which {name} is the main character. The story should use {words}.",
    "My son asked for a story about {name} with the words {words}.",
    "Please tell {name}'s story, and use {words} in it.",
    "Any chance of a children's story about {name}? Put in {words}.",
    "Create a short tale featuring {name}. Required words: {words}.",
    "I'm hoping for a sweet story about {name} that uses {words}.",
]
SIXTH_STARTS = ['The opening must be "{sentence}"', "Begin the story like this: {sentence}",
                'Make the first line "{sentence}"']
SIXTH_ENDS = ['The ending must be "{sentence}"', "End the story like this: {sentence}",
              'Make the last line "{sentence}"']
SETS = {"free": (FREE_WORDINGS, [], []), "check": (CHECK_WORDINGS, CHECK_STARTS, CHECK_ENDS),
        "fresh": (FRESH_WORDINGS, FRESH_STARTS, FRESH_ENDS), "later": (LATER_WORDINGS, LATER_STARTS, LATER_ENDS),
        "third": (THIRD_WORDINGS, THIRD_STARTS, THIRD_ENDS), "fourth": (FOURTH_WORDINGS, FOURTH_STARTS, FOURTH_ENDS),
        "fifth": (FIFTH_WORDINGS, FIFTH_STARTS, FIFTH_ENDS), "sixth": (SIXTH_WORDINGS, SIXTH_STARTS, SIXTH_ENDS)}
FIRST = 200  # valid.txt's first stories made the prompts the recipe was chosen on


def prompts(valid: Path, seed: int, wordings: str) -> list[dict]:
    stories = [s.strip() for s in valid.read_text(encoding="utf-8").split("<|endoftext|>") if s.strip()]
    rows = []
    for index, story in enumerate(stories[FIRST:]):
        rng = random.Random(f"{seed}:{index}")
        facts = story_facts(story)
        if not facts.name or len(facts.words) < 3:
            continue
        words = rng.sample(facts.words, 3)
        constraints = {"name": facts.name, "words": words}
        asks, starts, ends = SETS[wordings]
        request = rng.choice(asks).format(name=facts.name, words=word_list(words, rng))
        if starts:
            ask = rng.random()
            if ask < 1 / 3 and len(facts.sentences[0]) < 160:
                constraints["starts"] = facts.sentences[0]
                request += " " + rng.choice(starts).format(sentence=facts.sentences[0])
            elif ask < 2 / 3 and len(facts.sentences) >= 3 and len(facts.sentences[-1]) < 160:
                constraints["ends"] = facts.sentences[-1]
                request += " " + rng.choice(ends).format(sentence=facts.sentences[-1])
        rows.append({"kind": "story", "wording": wordings, "constraints": constraints,
                     "messages": [{"role": "user", "content": request}, {"role": "assistant", "content": story}]})
    return rows


def score_answers(prompts_file: Path, answers_file: Path, fluency_run: str) -> dict:
    """Scores of answers made elsewhere, one {"index", "answer", "ended"} row per prompt, as eval-assistant's."""
    from slm.assistant import following
    from slm.assistant.evaluate import add_fluency, answer_scores, read_prompts, reference, summarize
    from slm.data.tokenizer import get_tokenizer
    from slm.runs.checkpoint import checkpoint_dir, load_model

    rows = read_prompts(prompts_file)
    answers = [json.loads(line) for line in answers_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    model, _, _ = load_model(checkpoint_dir(fluency_run, "best"))
    tokenizer = get_tokenizer()
    texts = [a["answer"] for a in answers]
    scored = [answer_scores(rows[a["index"]][0]["constraints"], a["answer"], a.get("ended", True)) for a in answers]
    gold = [read.spike for read in following.surprise(model, tokenizer, [reference(row) for row, _ in rows])]
    add_fluency(scored, gold, following.surprise(model, tokenizer, texts),
                [rows[a["index"]][0]["constraints"] for a in answers])
    return summarize([(rows[a["index"]][0]["wording"], s) for a, s in zip(answers, scored)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sample", type=Path, help="folder with valid.txt")
    parser.add_argument("runs", nargs="*")
    parser.add_argument("--out", type=Path, required=True, help="the prompts file to write")
    parser.add_argument("--wordings", choices=tuple(SETS), default="sixth")
    parser.add_argument("--answers", type=Path, help="score these answers instead of running eval-assistant")
    # Not --seed: that is eval-assistant's (its sampling), passed on. Until 2026-12-07 it was this one, so the
    # sampled checks' `--seed 0` made their requests from seed 0 and sampled unseeded (benchmarks/assistant.md).
    parser.add_argument("--prompt-seed", type=int, default=2029,
                        help="the requests' words: 2026 made free's and check's, 2027 fresh's, 2028 later's, "
                             "4 fourth's, 5 fifth's, 6 sixth's")
    args, eval_flags = parser.parse_known_args()
    rows = prompts(args.sample / "valid.txt", args.prompt_seed, args.wordings)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{len(rows)} requests in {args.out}", file=sys.stderr)
    if args.answers:
        fluency = eval_flags[eval_flags.index("--fluency-run") + 1]
        print(json.dumps(score_answers(args.out, args.answers, fluency)))
        return 0
    subprocess.run([sys.executable, "-m", "slm", "eval-assistant", *args.runs, "--prompts", str(args.out),
                    *eval_flags], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
