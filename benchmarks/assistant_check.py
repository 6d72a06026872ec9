"""A final check of an assistant on requests no choice was made on: other stories, other wordings.

    python benchmarks/assistant_check.py ../shared/data/tinystories-sample RUN [RUN ...] --out /tmp/check.jsonl

The recipe and the sampling were chosen on requests made from the first 200 stories of valid.txt
(`slm make-instructions`' prompts). This check uses the stories after those, and wordings written here once,
in none of slm's phrasing lists, the way a person might ask: "hey can you make up a bedtime story ...".
Each asks for the story's main character and three of its words (the request the issue measures). It was
run once, on the final recipe; its figures are reported, never tuned on.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

from slm.constraints import story_facts, word_list

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
FIRST = 200  # valid.txt's first stories made the prompts the recipe was chosen on


def prompts(valid: Path, seed: int) -> list[dict]:
    stories = [s.strip() for s in valid.read_text(encoding="utf-8").split("<|endoftext|>") if s.strip()]
    rows = []
    for index, story in enumerate(stories[FIRST:]):
        rng = random.Random(f"{seed}:{index}")
        facts = story_facts(story)
        if not facts.name or len(facts.words) < 3:
            continue
        words = rng.sample(facts.words, 3)
        request = rng.choice(FREE_WORDINGS).format(name=facts.name, words=word_list(words, rng))
        rows.append({"kind": "story", "wording": "free", "constraints": {"name": facts.name, "words": words},
                     "messages": [{"role": "user", "content": request}, {"role": "assistant", "content": story}]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sample", type=Path, help="folder with valid.txt")
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", type=Path, required=True, help="the prompts file to write")
    parser.add_argument("--seed", type=int, default=2026)
    args, eval_flags = parser.parse_known_args()
    rows = prompts(args.sample / "valid.txt", args.seed)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{len(rows)} requests in {args.out}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "slm", "eval-assistant", *args.runs, "--prompts", str(args.out),
                    *eval_flags], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
