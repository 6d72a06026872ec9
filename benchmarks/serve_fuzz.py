"""`slm serve` fuzzed from its own OpenAPI schema for longer than the test suite does: the fuzz of
tests/serve/test_fuzz.py (same limits, schema and checks) with more examples, its figures printed.

    python benchmarks/serve_fuzz.py RUN                    # 2,000 requests per route and generation mode
    python benchmarks/serve_fuzz.py RUN --examples 200

The server runs in this process on the CPU. Printed: requests sent and status codes per route, the most
common refusals by message (numbers as N), every failure with the curl command that repeats it, and the
wall time. Exits 1 if any request failed. Needs `pip install ".[test]"` (schemathesis).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
from test_fuzz import ANSWER_S, fuzz, fuzz_app, fuzz_schema  # noqa: E402

from slm.serve.in_thread import serve_in_thread  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder to serve")
    parser.add_argument("--examples", type=int, default=2000,
                        help="requests per route and generation mode (default: %(default)s)")
    args = parser.parse_args()

    app = fuzz_app(args.run)
    start = time.perf_counter()
    with serve_in_thread(app) as url:
        tally = fuzz(url, fuzz_schema(app), args.examples)
    wall = time.perf_counter() - start
    print(f"slm serve fuzzed: {args.examples} examples per route and mode, {ANSWER_S} s a response at most")
    for route, statuses in tally.statuses.items():
        codes = ", ".join(f"{code}: {count}" for code, count in sorted(statuses.items(), key=str))
        print(f"  {route:28} {sum(statuses.values()):6} requests  ({codes})")
    print("most common refusals:")
    for message, count in tally.refusals.most_common(12):
        print(f"  {count:6}  {message[:110]}")
    print(f"failures: {len(tally.failures)}")
    for failure in tally.failures:
        print(f"  {failure}")
    requests = sum(sum(statuses.values()) for statuses in tally.statuses.values())
    print(f"wall time: {wall:.0f} s for {requests} requests ({requests / wall:.1f} a second)")
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
