"""`slm serve` fuzzed from its own OpenAPI schema (schemathesis): on every route, requests generated to fit the
schema and to break it, sent over HTTP to a server in this process. No answer may be a 5xx (nor an error event
in a 200 stream), come later than ANSWER_S, or refuse without OpenAI's JSON error saying what went wrong; and
afterwards the server still answers a good request. benchmarks/serve_fuzz.py runs fuzz() for longer."""

from __future__ import annotations

import collections
import dataclasses
import json
import re

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="the fuzz test generates requests with schemathesis")
httpx = pytest.importorskip("httpx")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from requests import RequestException  # noqa: E402 (schemathesis sends with requests)
from schemathesis import GenerationMode  # noqa: E402

from slm.serve.app import create_app  # noqa: E402
from slm.serve.in_thread import serve_in_thread  # noqa: E402
from slm.serve.schema import MAX_STOP_CHARS, MAX_STOPS  # noqa: E402

# Limits that keep every request the fuzzer can make short: at most 8 tokens a row (the default 16 rows), and
# rows still decoding 10 s after they were queued end with "length".
FUZZ_LIMITS = {"max_tokens": 8, "request_timeout": 10}
ANSWER_S = 30  # a response slower than this, on a busy 2-core machine, is a hang
# What schemathesis reads of a stream before it stops (its default: 20): far more than a stream under FUZZ_LIMITS
# sends (16 rows x 8 tokens, and 3 more), so that a stream cut short is one that ran past ANSWER_S.
STREAM_EVENTS = 10_000
ERROR_FIELDS = {"message", "type", "param", "code"}  # OpenAI's
NUMBER = re.compile(r"(?<![\w.-])\d+(\.\d+)?(e-?\d+)?(?![\w.])")  # 16, 0.5, 1e-06; not UTF-8's 8
MESSAGE = {"type": "object", "required": ["role", "content"],
           "properties": {"role": {"enum": ["system", "user", "assistant"]}, "content": {"type": "string"}}}


def fuzz_app(run):
    return create_app(run, device="cpu", **FUZZ_LIMITS)


def fuzz_schema(app) -> schemathesis.BaseSchema:
    """The app's OpenAPI schema with what the server checks itself written in: the served model's id (another
    is a 404), a chat message's shape (template.check_messages reads any list) and the stop strings' limits.
    Without them nearly every request that fits the schema would be refused before it reached the decoder."""
    spec = app.openapi()
    bodies = spec["components"]["schemas"]
    for name in ("CompletionRequest", "ChatRequest"):
        fields = bodies[name]["properties"]
        fields["model"] = {"const": app.state.server.model_id}
        fields["stop"].update(maxItems=MAX_STOPS, items={"type": "string", "minLength": 1,
                                                         "maxLength": MAX_STOP_CHARS})
    bodies["ChatRequest"]["properties"]["messages"].update(minItems=1, items=MESSAGE)
    # an explicit config, so that no schemathesis.toml where the test runs changes what it does
    config = schemathesis.Config.from_dict({"request-timeout": ANSWER_S, "max-stream-events": STREAM_EVENTS})
    return schemathesis.openapi.from_dict(spec, config=config)


@dataclasses.dataclass
class Tally:
    """What a fuzz run sent: status codes counted per route, refusals counted by their message (numbers as N),
    and each failure as what went wrong and the curl command that repeats it."""

    statuses: dict[str, collections.Counter] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(collections.Counter))
    refusals: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    failures: list[str] = dataclasses.field(default_factory=list)


def fuzz(url: str, schema: schemathesis.BaseSchema, examples: int) -> Tally:
    """Send `examples` generated requests per route and generation mode (fitting the schema, breaking it),
    derandomized so that a run is reproducible; failures are counted, not raised, so every route is fuzzed."""
    tally = Tally()
    for operation in (result.ok() for result in schema.get_all_operations()):
        # a route without a body takes nothing that could break its schema
        for mode in GenerationMode if operation.body else [GenerationMode.POSITIVE]:
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def send(case) -> None:
                try:
                    response = case.call(base_url=url)  # within ANSWER_S, a stream's whole time too
                except RequestException as err:
                    tally.statuses[operation.label]["no answer"] += 1
                    tally.failures.append(f"{type(err).__name__}: {case.as_curl_command()}")
                    return
                tally.statuses[operation.label][response.status_code] += 1
                if 400 <= response.status_code < 500 and (message := error_message(response)):
                    tally.refusals[NUMBER.sub("N", message)] += 1
                if problem := what_is_wrong(response):
                    tally.failures.append(f"{problem}: {case.as_curl_command()}")

            send()
    return tally


def error_message(response: schemathesis.Response) -> str | None:
    """The message of the body's OpenAI error, or None where the body is no such error or its message empty."""
    try:
        error = json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    if not (isinstance(error, dict) and set(error) == ERROR_FIELDS and isinstance(error["message"], str)):
        return None
    return error["message"].strip() or None


def what_is_wrong(response: schemathesis.Response) -> str | None:
    """Why a response breaks the server's promises (see the module), or None."""
    if response.status_code >= 500:
        return f"a server error ({response.status_code} {response.content[:200]!r})"
    if response.elapsed > ANSWER_S or response.stream_cut_short:
        return f"no whole answer within {ANSWER_S} s"
    if response.status_code >= 400 and not error_message(response):
        return f"a {response.status_code} without OpenAI's JSON error and its message: {response.content[:200]!r}"
    if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        events = [line for line in response.content.decode().splitlines() if line]
        if events[-1:] != ["data: [DONE]"] or any(event.startswith('data: {"error"') for event in events):
            return f"a stream with an error or no end: {events[-2:]!r}"
    return None


def test_requests_generated_from_the_schema_on_every_route_are_answered_and_the_server_goes_on(tiny_run):
    app = fuzz_app(tiny_run)
    with serve_in_thread(app) as url:
        tally = fuzz(url, fuzz_schema(app), examples=60)
        good = {"model": tiny_run.name, "messages": [{"role": "user", "content": "Tell me about Tom."}],
                "max_tokens": 4}
        answered = httpx.post(f"{url}/v1/chat/completions", json=good, timeout=60)
    assert not tally.failures, "\n".join(tally.failures)
    assert set(tally.statuses) == {"GET /", "GET /health", "GET /v1/models", "POST /v1/completions",
                                   "POST /v1/chat/completions"}
    for route in ("POST /v1/completions", "POST /v1/chat/completions"):  # both answers and refusals were fuzzed
        assert tally.statuses[route][200] and tally.statuses[route][400], (route, tally.statuses[route])
    assert answered.status_code == 200 and answered.json()["choices"][0]["finish_reason"]
