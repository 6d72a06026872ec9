"""`slm serve` under load and abuse: CLIENTS concurrent clients for LOAD_SECONDS against a real `slm serve`
process on a free local port, mixing well-formed chats and completions (plain and streamed, with long stop
strings, many messages, a seed) with malformed JSON, oversized bodies, too many or too long stop strings, too
many messages, bad seeds, and clients that leave mid-answer. It stops by itself; it checks that /health answers
throughout, no response is a 5xx, every well-formed request gets its whole answer, and the server's memory
(RSS) after the run is near what it was after the warm-up."""

import collections
import json
import os
import random
import re
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.slow

LOAD_SECONDS = 60.0
WARM_UP_SECONDS = 10.0  # RSS is compared from here, once every code path has run and the allocator has settled
CLIENTS = 64
KEY = "load-test-key"
MAX_TOKENS, MAX_MESSAGES, MAX_BODY_BYTES = 48, 200, 65_536
SERVE_FLAGS = ["--device", "cpu", "--port", "0", "--max-batch", "8", "--max-waiting", "16", "--max-tokens",
               str(MAX_TOKENS), "--max-messages", str(MAX_MESSAGES), "--max-body-bytes", str(MAX_BODY_BYTES)]
RSS_GROWTH_ALLOWED = 50 * 2**20  # bytes from the warm-up to the end: the allocator's slack, not a leak per request


@pytest.fixture
def served(tiny_run):
    """`slm serve` in its own process, its key from SLM_API_KEY: (url, pid, the error lines of its log) once
    uvicorn says it listens."""
    process = subprocess.Popen([sys.executable, "-m", "slm", "serve", str(tiny_run), *SERVE_FLAGS],
                               env={**os.environ, "SLM_API_KEY": KEY}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    log = collections.deque(maxlen=100)
    for line in process.stderr:
        log.append(line)
        if listening := re.search(r"Uvicorn running on (http://\S+)", line):
            break
    else:
        process.wait()
        pytest.fail("slm serve did not start:\n" + "".join(log))
    errors = []

    def drain() -> None:  # the access log fills the pipe unless read
        for line in process.stderr:
            if line.startswith("ERROR") or "Traceback" in line:
                errors.append(line)

    threading.Thread(target=drain, daemon=True).start()
    try:
        yield listening[1], process.pid, errors
    finally:
        process.terminate()
        process.wait(timeout=60)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


class Load:
    """The clients' shared tally: statuses per kind of request, and the well-formed answers that fell short."""

    def __init__(self, url: str, model: str, end: float) -> None:
        self.url, self.model, self.end = url, model, end
        self.lock = threading.Lock()
        self.statuses: collections.Counter = collections.Counter()
        self.short: list[str] = []

    def count(self, kind: str, status: int | str) -> None:
        with self.lock:
            self.statuses[kind, status] += 1

    def fail(self, kind: str, why: str) -> None:
        with self.lock:
            self.short.append(f"{kind}: {why}")

    # -- well-formed requests: retried after Retry-After while the queue is full, then checked whole ----------

    def answered(self, client: httpx.Client, kind: str, path: str, body: dict) -> None:
        while True:
            if body.get("stream"):
                with client.stream("POST", path, json=body) as response:
                    self.count(kind, response.status_code)
                    if response.status_code == 200:
                        return self.check_stream(kind, body, [line for line in response.iter_lines() if line])
                    response.read()
            else:
                response = client.post(path, json=body)
                self.count(kind, response.status_code)
                if response.status_code == 200:
                    return self.check_reply(kind, body, response.json())
            if response.status_code != 429:
                return self.fail(kind, f"status {response.status_code}: {response.text[:200]}")
            time.sleep(float(response.headers["retry-after"]))

    def check_reply(self, kind: str, body: dict, reply: dict) -> None:
        choice = reply["choices"][0]
        self.check_whole(kind, body, choice["finish_reason"], reply["usage"]["completion_tokens"])

    def check_stream(self, kind: str, body: dict, lines: list[str]) -> None:
        if lines[-1] != "data: [DONE]":
            return self.fail(kind, f"the stream ends with {lines[-1]!r}")
        chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
        reasons = [c["choices"][0]["finish_reason"] for c in chunks
                   if c["choices"] and c["choices"][0]["finish_reason"]]
        if len(reasons) != 1:
            return self.fail(kind, f"finish reasons {reasons}")
        self.check_whole(kind, body, reasons[0], chunks[-1]["usage"]["completion_tokens"])

    def check_whole(self, kind: str, body: dict, reason: str, tokens: int) -> None:
        """Whole: ended by end-of-text or a stop string, or after exactly max_tokens tokens."""
        if not ((reason == "stop" and 1 <= tokens <= body["max_tokens"]) or
                (reason == "length" and tokens == body["max_tokens"])):
            self.fail(kind, f"finish_reason {reason!r} after {tokens} of {body['max_tokens']} tokens")

    # -- refused requests: a 4xx in OpenAI's shape ---------------------------------------------------------------

    def refused(self, client: httpx.Client, kind: str, content: bytes, status: int,
                path: str = "/v1/chat/completions") -> None:
        response = client.post(path, content=content, headers={"Content-Type": "application/json"})
        self.count(kind, response.status_code)
        error = response.json().get("error", {}) if response.headers["content-type"] == "application/json" else {}
        if response.status_code != status or set(error) != {"message", "type", "param", "code"}:
            self.fail(kind, f"status {response.status_code} (not {status}): {response.text[:200]}")

    # -- one client ------------------------------------------------------------------------------------------------

    def client(self, number: int) -> None:
        rng = random.Random(number)
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=120) as client:
            while time.monotonic() < self.end:
                kind = rng.choice(KINDS)
                try:
                    getattr(self, kind)(client, kind, rng)
                except httpx.HTTPError as err:  # no answer at all: as much a failure as a 5xx
                    self.fail(kind, repr(err))

    def chat_body(self, rng: random.Random, messages: list[dict] | None = None, **extra) -> dict:
        messages = messages or [{"role": "user", "content": rng.choice(["Tell me about Tom.", "Lily had a ball.",
                                                                      "Write a story about a cat."])}]
        return {"model": self.model, "messages": messages, "max_tokens": rng.randint(1, MAX_TOKENS),
                "temperature": 0.8, **extra}

    def chat(self, client, kind, rng):
        self.answered(client, kind, "/v1/chat/completions", self.chat_body(rng))

    def streamed_chat(self, client, kind, rng):
        body = self.chat_body(rng, stream=True, stream_options={"include_usage": True})
        self.answered(client, kind, "/v1/chat/completions", body)

    def completion(self, client, kind, rng):
        body = {"model": self.model, "prompt": "Tom had a", "max_tokens": rng.randint(1, MAX_TOKENS),
                "seed": rng.randrange(2**64)}
        self.answered(client, kind, "/v1/completions", body)

    def long_stop_strings(self, client, kind, rng):
        stops = ["".join(rng.choices("abc ", k=256)) for _ in range(4)]
        self.answered(client, kind, "/v1/chat/completions", self.chat_body(rng, stop=stops))

    def many_messages(self, client, kind, rng):
        turns = [{"role": ("user", "assistant")[i % 2], "content": f"message {i} about the ball"}
                 for i in range(MAX_MESSAGES - 1)]
        self.answered(client, kind, "/v1/chat/completions", self.chat_body(rng, turns + [{"role": "user",
                                                                                       "content": "And then?"}]))

    def malformed_json(self, client, kind, rng):
        self.refused(client, kind, b'{"model": "x", "messages": [', 400)

    def oversized_body(self, client, kind, rng):
        self.refused(client, kind, b"{" + b" " * MAX_BODY_BYTES + b"}", 413)

    def too_many_stop_strings(self, client, kind, rng):
        self.refused(client, kind, json.dumps(self.chat_body(rng, stop=["a", "b", "c", "d", "e"])).encode(), 400)

    def too_long_stop_string(self, client, kind, rng):
        self.refused(client, kind, json.dumps(self.chat_body(rng, stop="x" * 30_000)).encode(), 400)

    def too_many_messages(self, client, kind, rng):
        messages = [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)
        self.refused(client, kind, json.dumps(self.chat_body(rng, messages)).encode(), 400)

    def bad_seed(self, client, kind, rng):
        body = {"model": self.model, "prompt": "Tom", "seed": rng.choice([2**64, -1, "7"])}
        self.refused(client, kind, json.dumps(body).encode(), 400, "/v1/completions")

    def leaves_mid_stream(self, client, kind, rng):
        with client.stream("POST", "/v1/chat/completions", json=self.chat_body(rng, stream=True)) as response:
            self.count(kind, response.status_code)
            if response.status_code == 200:
                next(response.iter_lines())  # the role chunk; then the client goes
                self.count(kind, "left")

    def leaves_before_the_answer(self, client, kind, rng):
        try:
            response = client.post("/v1/chat/completions", json=self.chat_body(rng), timeout=0.05)
            self.count(kind, response.status_code)
        except httpx.TimeoutException:
            self.count(kind, "left")


WELL_FORMED = ["chat", "streamed_chat", "completion", "long_stop_strings", "many_messages"]
KINDS = WELL_FORMED + ["malformed_json", "oversized_body", "too_many_stop_strings", "too_long_stop_string",
                       "too_many_messages", "bad_seed", "leaves_mid_stream", "leaves_before_the_answer"]


def test_64_clients_and_abuse_for_a_minute_leave_the_server_answering_in_bounded_memory(served, tiny_run):
    url, pid, errors = served
    start = time.monotonic()
    load = Load(url, tiny_run.name, start + LOAD_SECONDS)
    health, rss = [], []  # (status or exception name, seconds), (seconds since start, bytes)
    done = threading.Event()

    def watch() -> None:
        """/health and the server's RSS twice a second until the clients are done."""
        while not done.wait(0.5):
            asked = time.monotonic()
            try:
                health.append((httpx.get(f"{url}/health", timeout=30).status_code, time.monotonic() - asked))
            except httpx.HTTPError as err:
                health.append((type(err).__name__, time.monotonic() - asked))
            rss.append((time.monotonic() - start, rss_bytes(pid)))

    watcher = threading.Thread(target=watch)
    clients = [threading.Thread(target=load.client, args=(number,)) for number in range(CLIENTS)]
    for thread in [watcher, *clients]:
        thread.start()
    for thread in clients:
        thread.join()
    done.set()
    watcher.join()
    seconds = time.monotonic() - start

    warm = next(b for t, b in rss if t >= WARM_UP_SECONDS)
    by_kind = {kind: dict(sorted((str(s), n) for (k, s), n in load.statuses.items() if k == kind)) for kind in KINDS}
    responses = sum(n for (_, status), n in load.statuses.items() if isinstance(status, int))
    summary = (f"{seconds:.0f} s, {responses} responses: {by_kind}; /health {len(health)} "
               f"times, slowest {max(s for _, s in health):.2f} s; RSS {rss[0][1] / 2**20:.0f} MiB at "
               f"{rss[0][0]:.0f} s, {warm / 2**20:.0f} MiB after the warm-up, {max(b for _, b in rss) / 2**20:.0f} "
               f"MiB at most, {rss[-1][1] / 2**20:.0f} MiB at the end")
    print(summary)
    assert all(status == 200 for status, _ in health), summary
    assert not [s for (_, s), _ in load.statuses.items() if isinstance(s, int) and s >= 500], summary
    assert not load.short, f"{load.short[:10]}; {summary}"
    assert all(load.statuses[kind, 200] for kind in WELL_FORMED), summary
    assert rss[-1][1] - warm < RSS_GROWTH_ALLOWED, summary
    assert not errors, "".join(errors[:20])
