"""Where a batch-1 decoding step's time goes: cProfile (Python) and torch.profiler (operators) over greedy
steps of a preset's model (random weights: the speed does not depend on them), after three untimed runs.

    python benchmarks/decode_profile.py                 # the cpu preset, 100 steps
    python benchmarks/decode_profile.py --preset cpu --n-layer 4 --steps 200

benchmarks/README.md ("Decoding at batch 1 against llama.cpp") quotes its tables.
"""

import argparse
import cProfile
import pstats
from collections import deque

import torch
from torch.profiler import ProfilerActivity, profile

from slm.config import resolve
from slm.data.tokenizer import EOT_ID
from slm.inference.generate import decode
from slm.inference.sampling import SamplingSettings
from slm.model.gpt import GPT

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--preset", default="cpu")
parser.add_argument("--n-layer", type=int, help="override the preset's layers")
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--rows", type=int, default=20, help="lines of each table")
args = parser.parse_args()

torch.manual_seed(0)
cfg = resolve(args.preset, flags={"model": {"n_layer": args.n_layer}} if args.n_layer else {})
model = GPT(cfg.model).eval()
if cfg.model.vocab_head:  # frequencies as training sets them, so that the head's classes are real ids
    model.lm_head.set_frequencies(torch.randint(1, 10_000, (cfg.model.vocab_size,)))
settings = SamplingSettings(temperature=0, max_new_tokens=args.steps)


def run() -> None:
    deque(decode(model, [[EOT_ID]], settings), maxlen=0)


for _ in range(3):
    run()
python = cProfile.Profile()
python.runcall(run)
pstats.Stats(python).sort_stats("tottime").print_stats(args.rows)
with profile(activities=[ProfilerActivity.CPU]) as operators:
    run()
print(operators.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
