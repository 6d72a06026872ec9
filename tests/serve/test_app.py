"""`slm serve`, driven by the official openai client and a real browser, over an in-process server."""

import importlib.util
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai", reason="the serve tests use the official openai client")
httpx = pytest.importorskip("httpx")

from conftest import skip_unless_ci  # noqa: E402
from slm.cli import main  # noqa: E402
from slm.data.template import conversation_ids  # noqa: E402
from slm.data.tokenizer import get_tokenizer  # noqa: E402
from slm.inference.engine import Engine, TextDelta, complete  # noqa: E402
from slm.inference.sampling import SamplingSettings  # noqa: E402
from slm.runs.checkpoint import checkpoint_dir, load_model  # noqa: E402
from slm.serve.app import create_app  # noqa: E402
from slm.serve.in_thread import serve_in_thread  # noqa: E402

HELLO = [{"role": "user", "content": "Tell me about Tom."}]


@pytest.fixture(scope="module")
def url(tiny_run):
    with serve_in_thread(create_app(tiny_run, device="cpu", max_tokens=4000, max_body_bytes=10_000,
                                    max_messages=50)) as base:
        yield base


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(tiny_run):
    return load_model(checkpoint_dir(tiny_run), "cpu")[0]


def alone(model, prompt: list[int], max_tokens: int) -> str:
    """The greedy text of one prompt decoded alone by the engine: what the server must answer."""
    return complete(model, get_tokenizer(), [prompt], SamplingSettings(0.0, max_new_tokens=max_tokens))[0].text


def test_the_model_is_listed_by_its_run_folder_name(client, tiny_run):
    assert [m.id for m in client.models.list()] == [tiny_run.name]


def test_a_completion_is_the_engines_text_with_usage_and_a_finish_reason(client, tiny_run, model):
    reply = client.completions.create(model=tiny_run.name, prompt="Tom had a", max_tokens=6, temperature=0)
    prompt = get_tokenizer().encode("Tom had a")
    assert reply.choices[0].text == alone(model, prompt, 6)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(prompt)
    assert 1 <= reply.usage.completion_tokens <= 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_max_tokens_ends_a_completion_with_length(client, tiny_run):
    reply = client.completions.create(model=tiny_run.name, prompt="Lily liked the", max_tokens=1, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 1


def test_a_stop_string_ends_the_text_before_it(client, tiny_run, model):
    full = alone(model, get_tokenizer().encode("Tell me"), 8)
    stop = full[-1]  # a piece of text the greedy answer reaches
    reply = client.completions.create(model=tiny_run.name, prompt="Tell me", max_tokens=8, temperature=0,
                                      stop=["never", stop])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == full[:full.index(stop)]


def test_a_chat_completion_answers_with_the_chat_template(client, tiny_run, model):
    reply = client.chat.completions.create(model=tiny_run.name, messages=HELLO, max_tokens=6, temperature=0)
    prompt = conversation_ids(HELLO)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == alone(model, prompt, 6)
    assert reply.usage.prompt_tokens == len(prompt)


def test_a_streamed_chat_arrives_in_pieces_and_ends_with_a_reason_and_usage(client, tiny_run):
    chunks = list(client.chat.completions.create(model=tiny_run.name, messages=HELLO, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    whole = client.chat.completions.create(model=tiny_run.name, messages=HELLO, max_tokens=6, temperature=0)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_the_raw_stream_is_server_sent_events_ending_with_done(url, tiny_run):
    body = {"model": tiny_run.name, "prompt": "Tom", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_n_gives_that_many_choices(client, tiny_run):
    reply = client.chat.completions.create(model=tiny_run.name, messages=HELLO, max_tokens=4, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)


def test_the_same_seed_gives_the_same_text(client, tiny_run):
    def sample(seed):
        reply = client.completions.create(model=tiny_run.name, prompt="Once", max_tokens=10, temperature=1.0,
                                          seed=seed, n=2)
        return [c.text for c in reply.choices]

    assert sample(7) == sample(7)


def test_eight_concurrent_requests_are_all_answered_as_if_alone(client, tiny_run, model):
    # Prompts the tiny model continues differently, and n of 1 or 2: a row sent to the wrong request shows.
    prompts = ["Tell me", "ball", "Tom had a ball.", "<|user|>", "Tell me", "The end.", "cat", "Lily liked the"]

    def ask(i):
        return client.completions.create(model=tiny_run.name, prompt=prompts[i], max_tokens=8, temperature=0,
                                          n=1 + i % 2)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(8)))
    tokenizer = get_tokenizer()
    for i, reply in enumerate(replies):
        assert [c.text for c in reply.choices] == [alone(model, tokenizer.encode(prompts[i]), 8)] * (1 + i % 2)


def test_a_short_request_is_answered_while_a_long_one_decodes(client, tiny_run):
    long = client.completions.create(model=tiny_run.name, prompt="Tom", max_tokens=4000, temperature=0,
                                     stream=True)
    started, leave, long_done = threading.Event(), threading.Event(), threading.Event()

    def read_long():
        for _ in long:
            started.set()
            if leave.is_set():
                break  # the client leaves: the server drops its rows
        else:
            long_done.set()
        long.close()

    reader = threading.Thread(target=read_long)
    reader.start()
    started.wait()
    short = client.completions.create(model=tiny_run.name, prompt="Tell me", max_tokens=2, temperature=0.5)
    assert short.choices[0].finish_reason and not long_done.is_set()
    leave.set()
    reader.join()
    assert client.completions.create(model=tiny_run.name, prompt="Tom", max_tokens=2).choices


def test_a_request_joins_the_running_batch_and_its_greedy_text_is_the_same_as_alone(url, client, tiny_run, model,
                                                                                  monkeypatch):
    rows_per_step, step = [], Engine.step

    def counted(engine):
        rows_per_step.append(len(engine.rows))
        return step(engine)

    monkeypatch.setattr(Engine, "step", counted)
    tokenizer = get_tokenizer()  # the server's too: with no end-of-text id, every row runs to its max_tokens
    monkeypatch.setattr(type(tokenizer), "eot_id", property(lambda self: -1))
    long = client.completions.create(model=tiny_run.name, prompt="Tom", max_tokens=4000, temperature=1.0,
                                     top_p=0.9, stop=["zzz"], stream=True)
    chunks = iter(long)
    next(chunks)  # the long request is decoding
    for prompt, seed in (("Lily had", None), ("Tell me", 3)):
        joined = len(rows_per_step)
        reply = client.completions.create(model=tiny_run.name, prompt=prompt, max_tokens=12, temperature=0,
                                          seed=seed)
        assert reply.choices[0].text == alone(model, tokenizer.encode(prompt), 12)
        assert max(rows_per_step[joined:]) == 2  # it decoded beside the long one, not after it
    assert next(chunks).choices[0].finish_reason is None  # and the long one decodes on
    long.close()


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, url, tiny_run):
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=tiny_run.name, prompt="Tom", max_tokens=0)
    assert bad.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="at most 4000"):
        client.completions.create(model=tiny_run.name, prompt="Tom", max_tokens=4001)
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt="Tom", max_tokens=2)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=tiny_run.name, prompt="Tom had a ball. " * 20, max_tokens=2)
    assert long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=tiny_run.name, messages=[{"role": "robot", "content": "hi"}])

    for body, status, param in [(b'{"model": "x", "prompt": ', 400, None),
                                (json.dumps({"model": tiny_run.name}).encode(), 400, "prompt"),
                                (json.dumps({"model": tiny_run.name, "prompt": "a", "stop": ""}).encode(), 400, "stop"),
                                (b"{" + b" " * 20_000 + b"}", 413, None)]:
        response = httpx.post(f"{url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param
    assert httpx.get(f"{url}/v1/nowhere").json()["error"]["message"]

    assert client.completions.create(model=tiny_run.name, prompt="Tom", max_tokens=2).choices[0].finish_reason


def test_a_failed_generation_is_a_server_error_and_the_server_goes_on(client, tiny_run, monkeypatch):
    def broken(*args):
        raise RuntimeError("a bug in the engine")

    monkeypatch.setattr(Engine, "step", broken)
    with pytest.raises(openai.InternalServerError, match="generation failed"):
        client.completions.create(model=tiny_run.name, prompt="Tom", max_tokens=2)
    with pytest.raises(openai.APIError, match="generation failed"):  # the status went out before the failure
        list(client.chat.completions.create(model=tiny_run.name, messages=HELLO, max_tokens=2, stream=True))
    monkeypatch.undo()
    assert client.completions.create(model=tiny_run.name, prompt="Tom", max_tokens=2).choices


def test_an_api_key_is_enforced_when_set(tiny_run):
    with serve_in_thread(create_app(tiny_run, device="cpu", api_key="sesame", max_tokens=4)) as base:
        stranger = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as refused:
            stranger.models.list()
        assert refused.value.body["code"] == "invalid_api_key"
        anonymous = httpx.post(f"{base}/v1/completions", json={"model": tiny_run.name, "prompt": "Tom"})
        assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
        friend = openai.OpenAI(base_url=f"{base}/v1", api_key="sesame", max_retries=0)
        assert friend.completions.create(model=tiny_run.name, prompt="Tom", max_tokens=2).choices
        assert httpx.get(f"{base}/health").json() == {
            "status": "ok", "model": tiny_run.name, "max_tokens": 4, "api_key_required": True,
            "sampling": {"temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0, "word_bias": 0.0,
                         "word_reach": 0.0, "dry_multiplier": 0.0, "best_of": 1}}  # OpenAI's


def test_settings_a_request_leaves_out_come_from_the_runs_sampling_json(tiny_run, tmp_path, model):
    run = tmp_path / "greedy"
    shutil.copytree(tiny_run, run)
    (run / "sampling.json").write_text('{"temperature": 0, "repetition_penalty": 1.0}')
    with serve_in_thread(create_app(run, device="cpu", max_tokens=12)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        assert httpx.get(f"{base}/health").json()["sampling"] == {"temperature": 0.0, "top_p": 1.0,
                                                                  "repetition_penalty": 1.0, "word_bias": 0.0, "word_reach": 0.0,
                                                                  "dry_multiplier": 0.0, "best_of": 1}
        texts = {client.completions.create(model="greedy", prompt="Tom", seed=seed).choices[0].text for seed in (1, 2)}
        assert texts == {alone(model, get_tokenizer().encode("Tom"), 12)}  # greedy whatever the seed
        sampled = {client.completions.create(model="greedy", prompt="Tom", seed=seed, temperature=2.0).choices[0].text
                   for seed in (1, 2, 3)}
        assert len(sampled) > 1  # a request's own temperature wins
        asked = [{"role": "user", "content": "Write about Draco."}]  # a name is pushed from the first id
        plain = client.chat.completions.create(model="greedy", messages=asked).choices[0].message.content
        pushed = client.chat.completions.create(model="greedy", messages=asked, extra_body={"word_bias": 100})
        assert "Draco" not in plain and pushed.choices[0].message.content.lstrip().startswith("Draco")
        best = client.chat.completions.create(model="greedy", messages=asked, n=2, temperature=1.0, seed=3,
                                              extra_body={"best_of": 3, "word_bias": 100})
        assert len(best.choices) == 2 and all("Draco" in c.message.content for c in best.choices)
        ending = [{"role": "user", "content": "Write about a dog. The last sentence: They slept well."}]
        ended = client.chat.completions.create(model="greedy", messages=ending).choices[0].message.content
        assert ended.endswith("They slept well.")
    (run / "sampling.json").write_text('{"temperature": "hot"}')
    assert main(["serve", str(run)]) == 2  # a bad file is a one-line error, not a traceback


@pytest.mark.parametrize("flags, error", [(["--max-batch", "0"], "--max-batch must be at least 1"),
                                          (["--max-waiting", "-1"], "--max-waiting must be at least 0"),
                                          (["--max-messages", "0"], "--max-messages must be at least 1"),
                                          (["--request-timeout", "0"], "--request-timeout must be more than 0")])
def test_serve_refuses_bad_limits_in_one_line(tiny_run, capsys, flags, error):
    assert main(["serve", str(tiny_run), *flags]) == 2
    assert capsys.readouterr().err.startswith(f"slm: error: {error}")


def test_serve_shows_examples_in_its_help(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "examples:" in capsys.readouterr().out


# ---- limits that hold ---------------------------------------------------------------------------------------

@pytest.fixture
def endless(monkeypatch):
    """The engine swapped for one that never finishes a row (an "a" per step): a request then ends only by its
    client leaving or its time limit. The event is set once the worker has dropped every row."""
    dropped, remove = threading.Event(), Engine.remove

    def step(engine):
        time.sleep(0.01)  # a model's step takes time; this keeps the fake from flooding the queues
        deltas = []
        for row in engine.rows:
            row.generated += 1
            deltas.append((row, TextDelta(0, "a", row.generated)))
        return deltas

    def remove_and_tell(engine, row):
        remove(engine, row)
        if not engine.rows:
            dropped.set()

    monkeypatch.setattr(Engine, "step", step)
    monkeypatch.setattr(Engine, "remove", remove_and_tell)
    return dropped


def post(url: str, body: dict | bytes, path: str = "/v1/completions") -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}{path}", content=content, headers={"Content-Type": "application/json"}, timeout=60)


def test_at_most_four_stop_strings_of_at_most_256_characters(url, tiny_run):
    ask = {"model": tiny_run.name, "prompt": "Tom", "max_tokens": 4}
    assert post(url, {**ask, "stop": ["x" * 256] * 4}).json()["choices"][0]["finish_reason"]
    for stop, words in ((["x"] * 5, "at most 4"), ("x" * 257, "1 to 256"), ([7], "list of strings")):
        refused = post(url, {**ask, "stop": stop})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "stop"
        assert words in refused.json()["error"]["message"]


@pytest.mark.parametrize("seed", [2**64, -1, "7", 1.5, True])
def test_a_seed_outside_0_to_2_to_the_64_or_not_an_integer_is_refused(url, tiny_run, seed):
    refused = post(url, {"model": tiny_run.name, "prompt": "Tom", "max_tokens": 2, "seed": seed})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "seed"


def test_the_largest_seed_is_taken(url, tiny_run):
    assert post(url, {"model": tiny_run.name, "prompt": "Tom", "max_tokens": 2, "seed": 2**64 - 1}).status_code == 200


@pytest.mark.parametrize("body", [
    b'{"model": "MODEL", "prompt": "Tom", "temperature": NaN}',  # Python's json reads NaN and Infinity
    b'{"model": "MODEL", "prompt": "Tom", "top_p": NaN}',
    b'{"model": "MODEL", "prompt": "Tom", "repetition_penalty": Infinity}',
    b'{"model": "MODEL", "prompt": [1, 2, 3]}',
    b'{"model": "MODEL", "prompt": "Tom", "n": 100000000000000000000}',
    b'{"model": "MODEL", "prompt": "Tom", "max_tokens": 100000000000000000000}',
    b'{"model": "MODEL", "prompt": "Tom", "stream_options": "yes"}',
    b'{"model": "\\ud800", "prompt": "Tom"}',
    b'{"model": "\xff\xfe"}',
    b'[]',
    b'[' * 5000,
], ids=lambda body: body[:40].decode("utf-8", "replace"))
def test_a_malformed_field_is_a_client_error_in_openais_shape(url, tiny_run, body):
    response = post(url, body.replace(b"MODEL", tiny_run.name.encode()))
    assert 400 <= response.status_code < 500, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("field, value", [("temperature", 5e-324), ("temperature", 1e-40), ("top_p", 5e-324),
                                          ("repetition_penalty", 5e-324), ("repetition_penalty", 1e-40)])
def test_a_sampling_number_too_small_to_sample_with_is_refused(url, tiny_run, field, value):
    # Found by test_fuzz.py: a 500, as logits divided by the number overflowed float32 (top_p rounded to 0).
    refused = post(url, {"model": tiny_run.name, "prompt": "Tom", "max_tokens": 2, field: value})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == field, refused.text
    assert "0.000001" in refused.json()["error"]["message"]  # the least it takes
    smallest = {"temperature": 1e-6, "top_p": 1e-6, "repetition_penalty": 1e-6}
    assert post(url, {"model": tiny_run.name, "prompt": "Tom", "max_tokens": 2, **smallest}).status_code == 200


def test_a_body_not_in_utf_8_is_refused_saying_so(url, tiny_run):
    # Found by test_fuzz.py: FastAPI's "There was an error parsing the body" did not say what was wrong.
    refused = post(url, b'{"model": "MODEL", "prompt": "\xff"}'.replace(b"MODEL", tiny_run.name.encode()))
    assert refused.status_code == 400
    assert refused.json()["error"]["message"].startswith("the request body is not UTF-8 JSON ('utf-8' codec can't")


def test_malformed_messages_are_client_errors(url, tiny_run):
    for messages in ("hi", [{"role": "user", "content": 5}], [{"role": "user", "content": [{"type": "text"}]}],
                     [{"role": ["user"], "content": "hi"}]):
        response = post(url, {"model": tiny_run.name, "messages": messages}, "/v1/chat/completions")
        assert response.status_code == 400 and response.json()["error"]["message"], response.text


def test_a_chat_over_max_messages_is_refused_and_one_at_it_is_answered(url, tiny_run):
    turns = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}"} for i in range(50)]
    refused = post(url, {"model": tiny_run.name, "messages": [*turns, HELLO[0]]}, "/v1/chat/completions")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages"
    assert "at most 50 (slm serve --max-messages)" in refused.json()["error"]["message"]
    answered = post(url, {"model": tiny_run.name, "messages": [*turns[1:], HELLO[0]], "max_tokens": 2},
                    "/v1/chat/completions")
    assert answered.json()["choices"][0]["finish_reason"]


def test_a_full_queue_is_answered_429_with_retry_after_until_a_row_frees(tiny_run, endless):
    body = {"model": tiny_run.name, "prompt": "Tom", "max_tokens": 100, "stream": True}
    with serve_in_thread(create_app(tiny_run, device="cpu", max_batch=1, max_waiting=1)) as base:
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as decoding, \
                httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as waiting:
            assert decoding.status_code == waiting.status_code == 200
            refused = post(base, {**body, "stream": False})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded" and "--max-waiting" in refused.text
        assert endless.wait(60)  # the clients have gone: the worker dropped the decoding row
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=5, timeout=60)
        with client.completions.create(model=tiny_run.name, prompt="Tom", max_tokens=100, stream=True) as again:
            assert next(iter(again)).choices[0].text == "a"  # admitted, retrying after Retry-After if need be


def test_a_request_past_its_time_limit_ends_with_length_and_stops_decoding(tiny_run, endless):
    with serve_in_thread(create_app(tiny_run, device="cpu", request_timeout=1)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.completions.create(model=tiny_run.name, prompt="Tom", max_tokens=500)
        assert reply.choices[0].finish_reason == "length" and set(reply.choices[0].text) <= {"a"}
        assert endless.wait(60)
        chunks = list(client.chat.completions.create(model=tiny_run.name, messages=HELLO, max_tokens=500,
                                                     stream=True))
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]
        # answered whole (best of 2): what the candidates wrote by the deadline, not an empty answer
        whole = client.chat.completions.create(model=tiny_run.name, messages=HELLO, max_tokens=500, n=2,
                                               extra_body={"best_of": 2})
        assert [c.finish_reason for c in whole.choices] == ["length", "length"]
        assert all(c.message.content and set(c.message.content) <= {"a"} for c in whole.choices)


def test_decoding_stops_when_the_client_disconnects_streaming_or_not(url, tiny_run, endless):
    body = {"model": tiny_run.name, "prompt": "Tom", "max_tokens": 4000}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting and closes its connection
        httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=1))
    assert endless.wait(60)
    endless.clear()
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as streamed:
        next(streamed.iter_lines())
    assert endless.wait(60)


def test_the_api_key_may_come_from_the_environment_and_the_flag_wins(tiny_run, monkeypatch):
    import slm.serve.app

    apps = []
    monkeypatch.setattr(slm.serve.app.uvicorn, "run", lambda app, **kwargs: apps.append(app))
    monkeypatch.setenv("SLM_API_KEY", "from-env")
    assert main(["serve", str(tiny_run), "--device", "cpu"]) == 0
    assert main(["serve", str(tiny_run), "--device", "cpu", "--api-key", "from-flag"]) == 0
    for app, key, other in zip(apps, ("from-env", "from-flag"), ("from-flag", "from-env")):
        with serve_in_thread(app) as base:
            assert httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
            assert httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {other}"}).status_code == 401
    monkeypatch.setenv("SLM_API_KEY", "")
    assert main(["serve", str(tiny_run), "--device", "cpu"]) == 2  # set but empty: refused, not keyless


def test_serving_beyond_this_machine_without_a_key_warns(tiny_run, monkeypatch, capsys):
    import slm.serve.app

    monkeypatch.setattr(slm.serve.app.uvicorn, "run", lambda app, **kwargs: None)
    monkeypatch.delenv("SLM_API_KEY", raising=False)
    assert main(["serve", str(tiny_run), "--device", "cpu", "--host", "0.0.0.0"]) == 0
    assert "slm: warning: serving on 0.0.0.0 without an API key" in capsys.readouterr().err
    for flags in (["--host", "127.0.0.1"], ["--host", "::1"], ["--host", "0.0.0.0", "--api-key", "sesame"]):
        assert main(["serve", str(tiny_run), "--device", "cpu", *flags]) == 0
        assert "warning" not in capsys.readouterr().err


# ---- the web page, in a real browser --------------------------------------------------------------------------

@pytest.fixture
def browser(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver and importlib.util.find_spec("selenium")):
        skip_unless_ci("the browser test needs Debian's chromium and chromium-driver (apt-get install chromium "
                       "chromium-driver) and selenium (in the test extra)")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=900,700", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    yield browser
    browser.quit()


def open_greedy_page(browser, url, tiny_run, max_tokens: int):
    """The chat page, loaded and set to greedy answers of `max_tokens`; the wait to use on it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: tiny_run.name in b.find_element(By.ID, "model").text)
    for field, value in (("temperature", "0"), ("max-tokens", str(max_tokens))):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    return wait


def test_the_chat_page_streams_an_answer_and_keeps_the_conversation(browser, url, client, tiny_run):
    from selenium.webdriver.common.by import By

    wait = open_greedy_page(browser, url, tiny_run, max_tokens=6)
    # Count the changes to the answer's text as they are made: a streamed answer grows in steps.
    browser.execute_script("window.updates = 0; new MutationObserver(() => window.updates++)"
                           ".observe(document.getElementById('log'), {subtree: true, childList: true});")
    for turn in ("Tell me about Tom.", "And Lily?"):
        browser.find_element(By.ID, "input").send_keys(turn)
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: b.find_element(By.ID, "send").text == "send" and
                   len(b.find_elements(By.CSS_SELECTOR, ".assistant")) == 1 + (turn == "And Lily?"))
    conversation = browser.execute_script("return messages")
    assert [m["role"] for m in conversation] == ["user", "assistant", "user", "assistant"]
    expected = client.chat.completions.create(model=tiny_run.name, messages=conversation[:3], max_tokens=6,
                                              temperature=0).choices[0].message.content
    assert conversation[3]["content"] == expected
    assert browser.find_elements(By.CSS_SELECTOR, ".assistant")[-1].text.startswith(expected.strip())
    assert browser.execute_script("return window.updates") > 4  # two questions, two answers, and their growth
    assert not browser.find_elements(By.CSS_SELECTOR, ".error")


def test_the_readmes_picture_of_the_page_is_shot_from_the_page_served_now(browser, url, tiny_run):
    """docs/chat-page.png is re-shot on every run of this test, a real question and the tiny run's answer,
    so the README never shows an older page than the one served."""
    from selenium.webdriver.common.by import By

    wait = open_greedy_page(browser, url, tiny_run, max_tokens=40)
    browser.find_element(By.ID, "input").send_keys("Write a short story about Tom and his red ball.")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda b: b.find_element(By.ID, "send").text == "send" and b.find_elements(By.CSS_SELECTOR, ".assistant"))
    assert browser.find_elements(By.CSS_SELECTOR, ".assistant")[0].text.strip()
    picture = browser.get_screenshot_as_png()
    assert picture[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(picture[16:20], "big") == 900  # the window's width
    docs = Path(__file__).resolve().parents[2] / "docs"
    partial = docs / "chat-page.png.partial"
    partial.write_bytes(picture)
    partial.replace(docs / "chat-page.png")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or torch.get_num_threads() < 2,
                    reason="counts a Linux process's threads; one CPU thread starts no OpenMP pool")
def test_the_app_makes_its_tensors_without_leaving_an_openmp_pool_on_the_calling_thread(tiny_run):
    """A pool left beside the worker's makes libgomp throttle every op of a decoding step (worker.on_passing_thread);
    in a fresh process, weights or a cache made on the main thread (a cache of 512 rows is large enough for a
    parallel fill) leave one thread behind per CPU thread past the first."""
    script = ("import os, sys, torch\n"
              "from slm.serve.app import create_app\n"
              "before = len(os.listdir('/proc/self/task'))\n"
              "app = create_app(sys.argv[1], device='cpu', max_batch=512)\n"
              "print(len(os.listdir('/proc/self/task')) - before)\n")
    made = subprocess.run([sys.executable, "-c", script, str(tiny_run)], capture_output=True, text=True, check=True)
    assert made.stdout.split()[-1] == "0", made.stdout + made.stderr
