"""The `cpu` preset search: train each candidate for the same wall-clock budget, choose on held-out text.

    python benchmarks/cpu_search.py ../shared/data/tinystories-sample --minutes 3 --out /tmp/search

Each candidate is the `cpu` preset with BASE (the preset as the search found it) and a few flags over it.
train.txt is prepared once with 2 % of its stories held out (the prepared folder's validation split); each
candidate trains with `slm train --max-minutes` on the rest and is scored with `slm eval` on that held-out
slice, in bits per byte, the figure the candidates are ranked by. valid.txt chooses nothing: it is scored once, for the winner only, so the
figure reported for the chosen preset comes from text that no choice looked at. Results go to
OUT/results.jsonl (one line per candidate, kept across invocations so an interrupted search continues) and
print as a Markdown table, best first, then the winner's valid.txt score. Runs are sequential on purpose:
two at once would share the cores and each would get fewer steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# name -> flags over BASE: the optimizer, the learning rates, width and depth, batch, warm-up and decay, and the
# compact head's size. BASE is the `cpu` preset as this search found it (3 layers x 256, context 128, AdamW at
# 2e-3, batch 16, weight decay 0.1, cosine decay), so the table reproduces whatever the preset has become since
# (it is this search's winner now; but Muon now orthogonalises c_attn's q, k and v apart, which the rows in
# cpu_preset.md measured before that change did not, as it says).
BASE = ["--optimizer", "adamw", "--learning-rate", "2e-3", "--min-learning-rate", "2e-4", "--batch-size", "16",
        "--micro-batch-size", "16", "--block-size", "128", "--weight-decay", "0.1", "--decay", "cosine",
        "--windows", "random"]
MUON = ["--optimizer", "muon"]
MUON_BEST = [*MUON, "--learning-rate", "3e-3", "--min-learning-rate", "3e-4", "--batch-size", "32",
             "--micro-batch-size", "32"]  # the 2.5-minute search's winner ("muon*" below)
MUON_256 = [*MUON_BEST, "--block-size", "256", "--batch-size", "16", "--micro-batch-size", "16"]
PRESET_2024 = [*MUON_256, "--weight-decay", "0.5", "--max-minutes", "0", "--max-steps", "2024"]  # see below
D2Z = [*PRESET_2024, "--decay", "linear", "--min-learning-rate", "0"]  # linear decay to zero
PRESET_1201 = [*D2Z, "--learning-rate", "5e-3"]  # the preset of 2026-12-01
CANDIDATES = {
    "preset": [],
    "muon": MUON,
    "muon, lr 1e-2": [*MUON, "--muon-learning-rate", "1e-2"],
    "muon, lr 2.5e-3": [*MUON, "--muon-learning-rate", "2.5e-3"],
    "muon, adamw lr 3e-3": [*MUON, "--learning-rate", "3e-3", "--min-learning-rate", "3e-4"],
    "muon, 4 layers": [*MUON, "--n-layer", "4"],
    "muon, width 320": [*MUON, "--n-embd", "320", "--n-head", "5"],
    "muon, batch 32": [*MUON, "--batch-size", "32", "--micro-batch-size", "32"],
    "muon, warm-up 20": [*MUON, "--warmup-steps", "20"],
    "muon, decay to 2e-5": [*MUON, "--min-learning-rate", "2e-5"],
    "muon, head 2,048": [*MUON, "--vocab-head", "2048"],
    # the two best changes above, together
    "muon, adamw lr 3e-3, batch 32": [*MUON, "--learning-rate", "3e-3", "--min-learning-rate", "3e-4",
                                      "--batch-size", "32", "--micro-batch-size", "32"],
    "muon, adamw lr 3e-3, muon lr 2.5e-3": [*MUON, "--learning-rate", "3e-3", "--min-learning-rate", "3e-4",
                                            "--muon-learning-rate", "2.5e-3"],
    # the best pair's learning rate and batch without Muon: is it the optimizer or the rest?
    "adamw, lr 3e-3, batch 32": ["--learning-rate", "3e-3", "--min-learning-rate", "3e-4", "--batch-size", "32",
                                 "--micro-batch-size", "32"],
    # 10 minutes train ~5 epochs of the sample's 1.7M tokens, where the 2.5-minute runs above train one: the
    # context, regularisation and the like, at 10 minutes (cpu_preset.md, "Context and weight decay")
    "muon*, context 256": MUON_256,
    "muon*, context 512": [*MUON_BEST, "--block-size", "512", "--batch-size", "8", "--micro-batch-size", "8"],
    "muon*, context 256, dropout 0.1": [*MUON_256, "--dropout", "0.1"],
    "muon*, context 256, decay 0.5": [*MUON_256, "--weight-decay", "0.5"],
    "muon*, context 256, decay 1": [*MUON_256, "--weight-decay", "1.0"],
    # the preset those chose, at a fixed 2,024 steps (its 10 minutes then) rather than a time budget: the machine's
    # pace drifted by 20 % in a night, and these candidates cost the same per step
    "preset*, 2,024 steps, linear decay to 0": D2Z,
    "preset*, 2,024 steps, linear decay to 0, muon lr 7e-3": [*D2Z, "--muon-learning-rate", "7e-3"],
    "preset*, 2,024 steps, linear decay to 0, decay 0.7": [*D2Z, "--weight-decay", "0.7"],
    "preset*, 2,024 steps, linear decay to 0, adamw lr 5e-3": [*D2Z, "--learning-rate", "5e-3"],
    # a larger compact head costs more per step: fewer steps, in the ratio of step times measured side by side
    # (head 6,144: 1.104 x the step of 4,096)
    "preset*, linear decay to 0, head 6,144, 1,833 steps": [*D2Z, "--vocab-head", "6144", "--max-steps", "1833"],
    # attention as two matmuls in bf16 (2026-12-02) made a step 12 % cheaper: that preset's own 10 minutes gave
    # 2,309 steps, and the candidates after it run that many (4 layers: fewer, in the ratio of step times)
    "preset 2026-12-01, its own 10 minutes": [*PRESET_1201, "--max-minutes", "10", "--max-steps", "100000"],
    "preset 2026-12-01, 2,309 steps, shuffled windows": [*PRESET_1201, "--max-steps", "2309", "--windows",
                                                         "shuffled"],
    "preset 2026-12-01, shuffled windows, 4 layers, 1,879 steps": [*PRESET_1201, "--windows", "shuffled",
                                                                   "--n-layer", "4", "--max-steps", "1879"],
}


def slm(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "slm", *args], check=True, capture_output=True, text=True).stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path, help="folder with train.txt and valid.txt")
    parser.add_argument("--out", type=Path, required=True, help="working folder: prepared data, runs, results")
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per candidate")
    parser.add_argument("--only", nargs="*", choices=list(CANDIDATES), help="run only these candidates")
    args = parser.parse_args()
    data, results = args.out / "data", args.out / "results.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    if not (data / "meta.json").is_file():
        slm("prepare", str(args.corpus / "train.txt"), "--out", str(data), "--val-fraction", "0.02")
    done = {(r["name"], r["minutes"]) for r in map(json.loads, results.read_text().splitlines())} \
        if results.is_file() else set()
    for name in args.only or CANDIDATES:
        if (name, args.minutes) in done:
            continue
        run = args.out / f"{name.replace(' ', '-').replace(',', '')}-{args.minutes:g}min"
        slm("train", "--preset", "cpu", "--data", str(data), "--out", str(run), "--force", "--sample-tokens", "0",
            "--max-minutes", str(args.minutes), *BASE, *CANDIDATES[name])
        scores = json.loads(slm("eval", str(run), "--data", str(data), "--json"))  # the held-out slice
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        tokens = max(r.get("tokens_seen", 0) for r in steps)
        record = {**scores, "name": name, "flags": CANDIDATES[name], "minutes": args.minutes, "trained_tokens": tokens,
                  "run": str(run)}
        with results.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{name}: {scores['bits_per_byte']:.4f} bits per byte on the held-out slice after {tokens:,} tokens",
              file=sys.stderr)
    rows = sorted((r for r in map(json.loads, results.read_text().splitlines()) if r["minutes"] == args.minutes),
                  key=lambda r: r["bits_per_byte"])
    print("| candidate | flags over BASE | minutes | tokens trained | bits per byte (held-out slice) | loss |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['name']} | `{' '.join(r['flags'])}` | {r['minutes']:g} | {r['trained_tokens']:,} | "
              f"{r['bits_per_byte']:.4f} | {r['loss']:.3f} |")
    winner = rows[0]
    final = json.loads(slm("eval", winner["run"], "--data", str(args.corpus / "valid.txt"), "--json"))
    print(f"\nwinner: {winner['name']}; on valid.txt (which chose nothing): {final['bits_per_byte']:.4f} bits per "
          f"byte, loss {final['loss']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
