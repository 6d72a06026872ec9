"""Aggregate tokens/s of `slm serve` with 1 and 8 concurrent clients (or any counts), printed as a table.

    python benchmarks/serve_clients.py runs/demo                        # 1 and 8 clients, 4 requests each
    python benchmarks/serve_clients.py runs/demo --clients 1 4 8 16 --max-tokens 64 --device cpu

The server runs in this process (slm.serve_thread.serve_in_thread) on a free port; each client is a thread with the
official openai client, sending its requests one after another: a completion from the same prompt at
temperature 0.8, max_tokens new tokens, not streamed. Tokens/s is every completion token of every client over
the wall time of the round; one warm-up request is not timed. A request may end early at end-of-text, so the
table also gives the mean completion length. Needs `pip install ".[serve]" openai`.
"""

import argparse
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import torch

from slm.serve import create_app
from slm.serve_thread import serve_in_thread


def round_of(client: openai.OpenAI, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    def one_client(_: int) -> list[tuple[int, float]]:
        done = []
        for _ in range(requests):
            start = time.perf_counter()
            reply = client.completions.create(model=model, prompt="Once upon a time", max_tokens=max_tokens,
                                              temperature=0.8)
            done.append((reply.usage.completion_tokens, time.perf_counter() - start))
        return done

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for client_results in pool.map(one_client, range(clients)) for r in client_results]
    wall = time.perf_counter() - start
    tokens = sum(t for t, _ in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "mean_tokens": tokens / len(results),
            "mean_latency_s": statistics.mean(s for _, s in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder to serve")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients per round")
    parser.add_argument("--requests", type=int, default=4, help="requests per client per round (default: 4)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default: 64)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    args = parser.parse_args()

    app = create_app(args.run, device=args.device, max_tokens=args.max_tokens, max_batch=max(args.clients))
    server = app.state.server
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        client.completions.create(model=server.model_id, prompt="Once", max_tokens=4)  # warm-up
        rounds = [round_of(client, server.model_id, n, args.requests, args.max_tokens) for n in args.clients]
    device = server.model.transformer.wte.weight.device
    print(f"slm serve {args.run}: {server.model_id}, {sum(p.numel() for p in server.model.parameters()):,} "
          f"parameters, device {device}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'clients':>7} {'requests':>8} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'mean tokens':>11} "
          f"{'mean latency s':>14}")
    for r in rounds:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['tokens']:>7} {r['seconds']:>8.2f} {r['tokens_per_s']:>9.1f} "
              f"{r['mean_tokens']:>11.1f} {r['mean_latency_s']:>14.2f}")


if __name__ == "__main__":
    main()
