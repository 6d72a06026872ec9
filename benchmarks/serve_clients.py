"""`slm serve` under concurrent clients: aggregate tokens/s and p50/p95 time to first token, printed as a table.

    python benchmarks/serve_clients.py runs/demo                        # 1, 8 and 32 clients
    python benchmarks/serve_clients.py runs/demo --clients 1 4 --seconds 20 --max-tokens 64 --device cpu

The server runs in this process (slm.serve.in_thread.serve_in_thread) on a free port, with --max-batch at the
largest client count. Each client is a thread with the official openai client that, for `--seconds`, streams
one completion after another: "Once upon a time", temperature 0.8, `--max-tokens` new tokens. Clients start
a tenth of a second apart and then run free, so requests arrive while others decode, as with real users.
Tokens/s is every completion token streamed over the round's wall time, from the first request sent to the
last answer ended; time to first token is from a request sent to its first text chunk. A request may end
early at end-of-text, so the table gives the mean completion length too. Needs `pip install openai`.
"""

import argparse
import os
import platform
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import torch

from slm.serve.app import create_app
from slm.serve.in_thread import serve_in_thread


def one_request(client: openai.OpenAI, model: str, max_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds to the first text chunk) of one streamed completion."""
    start, first = time.perf_counter(), None
    tokens = 0
    for chunk in client.completions.create(model=model, prompt="Once upon a time", max_tokens=max_tokens,
                                          temperature=0.8, stream=True, stream_options={"include_usage": True}):
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return tokens, first if first is not None else time.perf_counter() - start


def round_of(client: openai.OpenAI, model: str, clients: int, seconds: float, max_tokens: int) -> dict:
    results: list[tuple[int, float]] = []
    lock = threading.Lock()
    start = time.perf_counter()

    def one_client(index: int) -> None:
        time.sleep(index / 10)
        while time.perf_counter() - start < seconds:
            result = one_request(client, model, max_tokens)
            with lock:
                results.append(result)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one_client, range(clients)))
    wall = time.perf_counter() - start
    tokens = sum(t for t, _ in results)
    firsts = sorted(s for _, s in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "mean_tokens": tokens / len(results),
            "ttft_p50_s": statistics.median(firsts), "ttft_p95_s": firsts[min(len(firsts) - 1, int(0.95 * len(firsts)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder to serve")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients per round")
    parser.add_argument("--seconds", type=float, default=30, help="length of each round (default: 30)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default: 64)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    args = parser.parse_args()

    app = create_app(args.run, device=args.device, max_tokens=args.max_tokens, max_batch=max(args.clients))
    server = app.state.server
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        one_request(client, server.model_id, 4)  # warm-up
        rounds = [round_of(client, server.model_id, n, args.seconds, args.max_tokens) for n in args.clients]
    device = server.model.transformer.wte.weight.device
    print(f"slm serve {args.run}: {server.model_id}, {sum(p.numel() for p in server.model.parameters()):,} "
          f"parameters, device {device}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    print("| clients | requests | tokens | seconds | tokens/s | mean tokens | TTFT p50 s | TTFT p95 s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rounds:
        print(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} "
              f"| {r['mean_tokens']:.1f} | {r['ttft_p50_s']:.3f} | {r['ttft_p95_s']:.3f} |")


if __name__ == "__main__":
    main()
