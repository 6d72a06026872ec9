"""How long one person waits for a story: `slm serve RUN` with its own sampling.json, one client, chat requests
from a prompts file one after another, each answer whole (not streamed); p50 / p95 seconds per answer.

    python benchmarks/assistant_latency.py RUN --prompts RUN/prompts.jsonl --requests 20 [--best-of 1]

The server runs in this process (slm.serve.in_thread.serve_in_thread). `--best-of` and `--temperature` override
the run's sampling.json for every request (as API fields); without them each request gets the served default.
Needs `pip install openai`.
"""

import argparse
import os
import platform
import statistics
import time

import openai

from slm.assistant.evaluate import read_prompts
from slm.data.tokenizer import get_tokenizer
from slm.serve.app import create_app
from slm.serve.in_thread import serve_in_thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--best-of", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    app = create_app(args.run, device=args.device, max_tokens=256)
    server, tokenizer = app.state.server, get_tokenizer()
    extra = {k: v for k, v in (("best_of", args.best_of),) if v is not None}
    sampling = {k: v for k, v in (("temperature", args.temperature),) if v is not None}
    seconds, tokens = [], []
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        client.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        for _, messages in read_prompts(args.prompts)[:args.requests]:
            start = time.perf_counter()
            answer = client.chat.completions.create(model=server.model_id, messages=messages, max_tokens=256,
                                                    extra_body=extra, **sampling)
            seconds.append(time.perf_counter() - start)
            tokens.append(len(tokenizer.encode(answer.choices[0].message.content)))
    seconds.sort()
    print(f"slm serve {args.run} ({server.sampling} | {extra or ''} {sampling or ''}), "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{len(seconds)} answers, mean {statistics.mean(tokens):.0f} tokens: p50 {statistics.median(seconds):.2f} s, "
          f"p95 {seconds[min(len(seconds) - 1, int(0.95 * len(seconds)))]:.2f} s, "
          f"{sum(tokens) / sum(seconds):.0f} answer tokens/s")


if __name__ == "__main__":
    main()
