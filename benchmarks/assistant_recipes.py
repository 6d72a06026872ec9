"""The assistant recipe comparison: each recipe gets the same number of optimizer steps, then is scored.

    python benchmarks/assistant_recipes.py ../shared/data/tinystories-sample --out /tmp/recipes --steps 3000

Every recipe spends --steps optimizer steps of the `cpu` preset's batch (16 x 128 tokens), so each has the
same compute whatever else the machine runs (wall-clock figures are printed beside, for what they are worth
on a busy machine). A fine-tuning step costs what a pretraining step does (same model, same batch).

    P    plain pretraining                           (the story model every other is held against)
    A    instruction-conditioned pretraining          (--instruct-share SHARE)
    B    plain pretraining for 3/4, then fine-tuning on make-instructions' conversations for 1/4
    AB   conditioned pretraining for 3/4, then the same fine-tuning

Scores: `slm eval-assistant` (greedy, 256 new tokens) on the first 200 stories of valid.txt made into
requests, half in held-out wordings (OUT/prompts.jsonl), and `slm eval` bits per byte on all of valid.txt,
plain stories. Results go to OUT/results.jsonl (kept, so a rerun only scores what is missing) and print as
a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def slm(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "slm", *args], check=True, capture_output=True, text=True).stdout


def train(out: Path, data: Path, steps: int, *flags: str) -> float:
    """Minutes of `slm train` with the cpu preset for `steps` steps (no time budget)."""
    started = time.perf_counter()
    slm("train", "--preset", "cpu", "--data", str(data), "--out", str(out), "--max-minutes", "0", "--max-steps",
        str(steps), "--eval-interval", "500", "--sample-tokens", "0", "--force", *flags)
    return (time.perf_counter() - started) / 60


def finetune(out: Path, base: Path, chat: Path, steps: int) -> float:
    started = time.perf_counter()
    slm("finetune", str(base), "--data", str(chat), "--out", str(out), "--max-steps", str(steps), "--eval-interval",
        "250", "--force")
    return (time.perf_counter() - started) / 60


def recipes(share: float) -> dict[str, tuple[list[str], bool]]:
    """name -> (pretraining flags, whether a quarter of the steps go to fine-tuning)."""
    conditioned = ["--instruct-share", str(share)]
    return {"P": ([], False), "A": (conditioned, False), "B": ([], True), "AB": (conditioned, True)}


def score(run: Path, prompts: Path, valid: Path) -> dict:
    report = json.loads(slm("eval-assistant", str(run), "--prompts", str(prompts), "--json"))
    bits = json.loads(slm("eval", str(run), "--data", str(valid), "--json"))["bits_per_byte"]
    return {"scores": report["results"][0]["scores"], "bits_per_byte": bits}


def row(name: str, result: dict) -> str:
    s = result["scores"]
    cells = [name, f"{result['minutes']:.1f}", *(f"{s[w]['words']:.3f}" for w in ("seen", "held_out")),
             *(f"{s[w]['name']:.3f}" for w in ("seen", "held_out")), f"{s['all']['n_words']:.0f}",
             f"{s['all']['distinct4']:.3f}", f"{s['all']['ended']:.2f}", f"{result['bits_per_byte']:.4f}"]
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sample", type=Path, help="folder with train.txt and valid.txt")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps per recipe (default: 3000)")
    parser.add_argument("--share", type=float, default=0.5, help="--instruct-share of A and AB (default: 0.5)")
    parser.add_argument("--only", nargs="*", help="run only these recipes")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data, chat, prompts = args.out / "data", args.out / "chat.jsonl", args.out / "prompts.jsonl"
    if not (data / "meta.json").is_file():
        slm("prepare", str(args.sample), "--out", str(data), "--force")
    if not prompts.is_file():
        slm("make-instructions", str(args.sample), "--out", str(chat), "--prompts-out", str(prompts), "--epochs",
            "3", "--force")
    results_path = args.out / "results.jsonl"
    done = {}
    if results_path.is_file():
        done = {r["recipe"]: r for r in map(json.loads, results_path.read_text().splitlines())}
    for name, (flags, tuned) in recipes(args.share).items():
        if name in done or (args.only and name not in args.only):
            continue
        pretrain_steps = args.steps * 3 // 4 if tuned else args.steps
        minutes = train(args.out / (name + "0" if tuned else name), data, pretrain_steps, *flags)
        if tuned:
            minutes += finetune(args.out / name, args.out / (name + "0"), chat, args.steps - pretrain_steps)
        done[name] = {"recipe": name, "steps": args.steps, "minutes": minutes,
                      **score(args.out / name, prompts, args.sample / "valid.txt")}
        with open(results_path, "a") as f:
            f.write(json.dumps(done[name]) + "\n")
    print("| recipe | minutes | words (seen) | words (held-out) | name (seen) | name (held-out) | answer words "
          "| distinct 4-grams | ended | bits per byte |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, result in done.items():
        print(row(name, result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
