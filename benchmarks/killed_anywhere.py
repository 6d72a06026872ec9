"""Every stage killed anywhere, 20 times each (issue 30): the loop of tests/test_killed_anywhere.py with more
kills than the test suite affords. Prints, per stage, the kills, the states they left and whether the last
rerun ended with the outputs of a run never stopped; exits 1 if a stage failed.

    python benchmarks/killed_anywhere.py [--kills 20] [--seed 0] [--stage finetune ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import story_tokens, train, write_prepared  # noqa: E402
from test_killed_anywhere import killed_anywhere, stages  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20, help="kills per stage (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kills' delays")
    p.add_argument("--stage", action="append", help="only this stage (repeatable; default: all)")
    args = p.parse_args()
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = write_prepared(folder / "data", story_tokens(400, 0), story_tokens(40, 1))
        train(data, folder / "base")  # the run that finetune and export start from
        for name, stage in stages(folder, folder / "base").items():
            if args.stage and name not in args.stage:
                continue
            (folder / name).mkdir()
            start = time.monotonic()
            try:
                states = killed_anywhere(stage, folder / name, args.kills, args.seed)
                verdict = "pass"
            except AssertionError as err:
                states, verdict = {}, f"FAIL: {str(err).splitlines()[0]}"
                failed += 1
            seen = "; ".join(f"{state} x{n}" for state, n in sorted(states.items()))
            print(f"{name}: {args.kills} kills in {time.monotonic() - start:.0f} s | {seen} | {verdict}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
