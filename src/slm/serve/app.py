"""`slm serve`: an OpenAI-compatible HTTP API and a web chat page over one model (FastAPI + uvicorn).

    GET  /                      the chat page (page.html): streams answers, keeps the conversation
    GET  /health                {"status": "ok", "model": ID, "max_tokens": LIMIT, "api_key_required": BOOL,
                                 "sampling": the run's served sampling}
    GET  /v1/models             the one model; its id is the run folder's name
    POST /v1/completions        continue a prompt (a string or a list of strings)
    POST /v1/chat/completions   answer a conversation, rendered with the chat template (data/template.py)

Both POST endpoints take `model`, `max_tokens`, `temperature`, `top_p`, `n`, `stop` (a string or a list
of up to 4), `seed`, `stream`, `stream_options.include_usage` and the extensions `repetition_penalty` and
`word_bias` and `word_reach` (chats), `dry_multiplier` and `best_of` (answers decoded per choice, of which the
one that best follows the request is returned: slm.assistant.following); other fields are ignored. A sampling
field left out comes from RUN/sampling.json, else OpenAI's.
`stream: true` sends server-sent events, a chunk per piece of text, ending with `data: [DONE]`. Each
choice ends with the engine's finish reason: "stop" (end-of-text or a stop string) or "length".

Context: a completion prompt must be shorter than the model's context (block_size), else 400
`context_length_exceeded`; `max_tokens` may reach past the context, as generation's window slides. A chat
drops its oldest turns first, as `slm chat` does (template.fit_context; `usage.prompt_tokens` counts what is
kept), and is refused only when the system message and the newest message alone do not fit. Every error is
OpenAI's JSON shape, {"error": {"message", "type", "param", "code"}}, with a 4xx status for a client's mistake.

Limits (schema.py; flags of `slm serve`): a request asks for at most --max-batch rows and
--max-tokens per row, a chat has at most --max-messages messages, a body at most --max-body-bytes; past
--max-waiting rows waiting, a request is refused with 429 and Retry-After. --request-timeout after it is
queued, a request's rows still decoding end with "length"; when its client disconnects, streaming or not,
its rows leave the running batch at the next step.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from importlib import resources
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from slm.assistant import following
from slm.config import add_checkpoint_choice, add_placement
from slm.data.template import check_messages, conversation_ids, fit_for_answer
from slm.data.tokenizer import get_tokenizer
from slm.device import pick_device, pick_dtype
from slm.errors import SlmError
from slm.inference.sampling import RUN_SAMPLING, SamplingSettings, read_sampling
from slm.model.gpt import GPT
from slm.runs.checkpoint import checkpoint_dir, load_model
from slm.serve.schema import (ApiError, BodyLimit, ChatRequest, CompletionRequest, Limits, Sampling, busy,
                              generation_failed, invalid_body)
from slm.serve.worker import Job, Worker, on_passing_thread

API_KEY_ENV = "SLM_API_KEY"
LOOPBACK = ("127.0.0.1", "::1", "localhost")  # hosts only this machine can reach


class Server:
    """The model and its limits; turns requests into jobs for the worker, and their deltas into responses."""

    def __init__(self, model: GPT, model_id: str, created: int, limits: Limits,
                 sampling: dict[str, float] = {}) -> None:  # noqa: B006 (read, never changed)
        self.model, self.model_id, self.created, self.limits = model, model_id, created, limits
        # what a request that leaves a setting out gets: the run's measured choice, else OpenAI's default
        self.sampling = {key: getattr(SamplingSettings(), key) for key in RUN_SAMPLING} | sampling
        self.tokenizer = get_tokenizer()
        self.worker = Worker(model, self.tokenizer, limits.max_batch)
        self.jobs: list[Job] = []  # submitted, decoding or waiting; pruned of those gone at each submit

    def completion_prompts(self, body: CompletionRequest) -> list[list[int]]:
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise ApiError(400, "prompt is an empty list; give a string or a list of strings", "prompt")
        # An empty prompt starts a new document, as in `slm generate`.
        return [self.tokenizer.encode(text) or [self.tokenizer.eot_id] for text in texts]

    def chat_prompts(self, body: ChatRequest) -> list[list[int]]:
        if len(body.messages) > self.limits.max_messages:
            raise ApiError(400, f"the request has {len(body.messages)} messages; this server takes at most "
                           f"{self.limits.max_messages} (slm serve --max-messages): send only the newest ones",
                           "messages")
        try:
            messages = check_messages(body.messages, "request")
        except SlmError as err:
            raise ApiError(400, str(err), "messages") from None
        fitted = fit_for_answer(messages, self.model.config.block_size, self.max_new_tokens(body))
        return [conversation_ids(fitted)]

    def max_new_tokens(self, body: Sampling) -> int:
        asked = (isinstance(body, ChatRequest) and body.max_completion_tokens) or body.max_tokens
        if asked and asked > self.limits.max_tokens:
            raise ApiError(400, f"max_tokens is {asked}, but this server allows at most {self.limits.max_tokens} "
                           "(slm serve --max-tokens)", "max_tokens")
        return asked or self.limits.max_tokens

    def job(self, body: Sampling, prompts: list[list[int]]) -> Job:
        block_size = self.model.config.block_size
        for ids in prompts:
            if len(ids) >= block_size:
                raise ApiError(400, f"the prompt has {len(ids)} tokens, but this model's context holds {block_size} "
                               "with room for at least one new token", "messages" if isinstance(body, ChatRequest)
                               else "prompt", "context_length_exceeded")
        chosen = {key: default if getattr(body, key) is None else getattr(body, key)
                  for key, default in self.sampling.items()}
        settings = SamplingSettings(**chosen, max_new_tokens=self.max_new_tokens(body), stop=body.stop)
        chat = isinstance(body, ChatRequest)
        plan = following.plan(self.tokenizer, body.messages) if chat else following.Plan({}, [])
        return Job([ids for ids in prompts for _ in range(body.n)], settings, body.seed, asyncio.get_running_loop(),
                   time.monotonic() + self.limits.request_timeout, plan)

    def submit(self, job: Job) -> None:
        """Give the job to the worker, or refuse it (429) when the rows waiting for a free one would pass
        --max-waiting. Counted in rows, as the worker starts a request once it has a row for each choice."""
        self.jobs = [j for j in self.jobs if not j.gone()]
        waiting = sum(j.rows for j in self.jobs) - self.limits.max_batch
        if waiting + job.rows > self.limits.max_waiting:
            raise busy(max(waiting, 0))
        self.jobs.append(job)
        self.worker.submit(job)

    async def respond(self, body: Sampling, make_prompts, kind: str,
                      request: Request) -> dict[str, Any] | StreamingResponse:
        """The answer to a request, kind "chat" or "completion": JSON, or server-sent events with `stream`."""
        if body.model != self.model_id:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server has {self.model_id!r}",
                           "model", "model_not_found")
        best_of = body.best_of or int(self.sampling["best_of"])
        if body.rows * best_of > self.limits.max_batch:
            raise ApiError(400, f"{body.rows // body.n} prompt(s) x n={body.n} x best_of={best_of} is more than the "
                           f"{self.limits.max_batch} rows this server decodes at once (slm serve --max-batch)",
                           "best_of" if best_of > 1 else "n")
        prompts = await asyncio.to_thread(make_prompts, body)  # a long prompt takes a while to tokenize
        job = self.job(body, prompts)
        self.submit(job)
        head = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.model_id, "object": "chat.completion" if kind == "chat" else "text_completion"}
        prompt_tokens = sum(len(ids) for ids in prompts)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self._events(job, head, kind, prompt_tokens if include_usage else None),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts, last = [""] * len(job.prompts), {}

        async def collect() -> None:
            async for delta in self.worker.results(job):
                texts[delta.row] += delta.text
                last[delta.row] = delta

        try:
            answered = await _unless_disconnected(collect(), request)
        except Exception:
            raise generation_failed() from None
        if not answered:  # nobody reads this; 499 is nginx's "client closed request", for the log
            raise ApiError(499, "the client closed the connection before its answer was ready")
        choices = [{"index": row, **_content(kind, text, final=True), "logprobs": None,
                    "finish_reason": last[row].finish_reason} for row, text in enumerate(texts)]
        return {**head, "choices": choices, "usage": _usage(prompt_tokens, sum(d.tokens for d in last.values()))}

    async def _events(self, job: Job, head: dict, kind: str, prompt_tokens: int | None) -> AsyncIterator[str]:
        """Server-sent events: a chunk per delta, a last chunk with the usage when prompt_tokens is given."""
        head = {**head, "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}

        def event(choices: list[dict[str, Any]], **extra: Any) -> str:
            return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

        if kind == "chat":  # as OpenAI does, a first chunk names each choice's role
            yield event([{"index": row, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for row in range(len(job.prompts))])
        completion_tokens = 0
        try:
            async for delta in self.worker.results(job):
                completion_tokens += delta.tokens if delta.finish_reason else 0
                yield event([{"index": delta.row, **_content(kind, delta.text, final=False), "logprobs": None,
                              "finish_reason": delta.finish_reason}])
        except Exception:  # the 200 status has gone out; OpenAI's clients read an error event mid-stream
            yield f"data: {generation_failed().response().body.decode()}\n\n"
        if prompt_tokens is not None:
            yield event([], usage=_usage(prompt_tokens, completion_tokens))
        yield "data: [DONE]\n\n"


async def _unless_disconnected(work: Awaitable[None], request: Request) -> bool:
    """Run work to its end (True) unless the client disconnects first (False; work is cancelled, and with it
    its job). Once a request's body is read, the next message the server gives the app is http.disconnect;
    a streamed response needs none of this, as Starlette stops it at the client's disconnect itself."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        gone.cancel()
    if task in done:
        task.result()  # its exception, if it failed
    return task in done


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _content(kind: str, text: str, final: bool) -> dict[str, Any]:
    if kind == "completion":
        return {"text": text}
    if final:
        return {"message": {"role": "assistant", "content": text}}
    return {"delta": {"content": text} if text else {}}


# ---- the app ----------------------------------------------------------------------------------------------------

def create_app(run: str | Path, checkpoint: str = "best", device: str = "auto", api_key: str | None = None,
               dtype: str = "auto", **limits: Any) -> FastAPI:
    """The FastAPI app serving RUN's checkpoint; its worker thread runs while the app does (lifespan).
    `limits`: the fields of schema.Limits (max_tokens=..., max_batch=...), each defaulting to its flag's."""
    chosen = Limits(**limits)
    chosen.check()
    if api_key == "":
        raise SlmError(f"--api-key (or {API_KEY_ENV}) must not be empty; unset it to serve without a key")
    folder = checkpoint_dir(run, checkpoint)
    placement = pick_device(device)
    created = int((folder / "model.safetensors").stat().st_mtime)

    def server_of_loaded_model() -> Server:  # its tensors (weights, the worker's cache) made on a passing thread
        model, _, _ = load_model(folder, placement, pick_dtype(dtype, placement))
        return Server(model, Path(run).resolve().name, created, chosen, read_sampling(run))

    server = on_passing_thread(server_of_loaded_model)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.worker.start()
        yield
        server.worker.stop()

    app = FastAPI(title="slm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=chosen.max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        return invalid_body(err).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        if isinstance(err.__cause__, UnicodeDecodeError):  # FastAPI's words: "There was an error parsing the body"
            return ApiError(400, f"the request body is not UTF-8 JSON ({err.__cause__})").response()
        return ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}").response()

    add_routes(app, server, api_key)
    return app


def add_routes(app: FastAPI, server: Server, api_key: str | None) -> None:
    """The chat page, /health, and the OpenAI endpoints, which need the key when the server has one."""
    page = resources.files("slm.serve").joinpath("page.html").read_text(encoding="utf-8")

    async def authorize(request: Request) -> None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        given = key.encode() if scheme.lower() == "bearer" else b""
        if api_key is not None and not secrets.compare_digest(given, api_key.encode()):
            raise ApiError(401, "a valid API key is needed: send the header 'Authorization: Bearer KEY' "
                           f"with the key slm serve was given (--api-key or {API_KEY_ENV})", code="invalid_api_key")

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> str:
        return page

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": server.model_id, "max_tokens": server.limits.max_tokens,
                "sampling": server.sampling,
                "api_key_required": api_key is not None}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": server.created,
                                            "owned_by": "slm"}]}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        return await server.respond(body, server.completion_prompts, "completion", request)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatRequest, request: Request):
        return await server.respond(body, server.chat_prompts, "chat", request)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_choice(p)
    add_placement(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every network "
                   "(default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1; the environment "
                   f"variable {API_KEY_ENV} keeps the key out of the process list (default: {API_KEY_ENV}, else none)")
    p.add_argument("--max-tokens", type=int, default=Limits.max_tokens, help="the most tokens a request may "
                   "generate per choice, and what it gets without max_tokens: a cap, so above generate's and chat's "
                   "--max-new-tokens (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=Limits.max_batch, help="the most rows decoded at once; n "
                   "choices take n rows, and later requests wait (default: %(default)s)")
    p.add_argument("--max-waiting", type=int, default=Limits.max_waiting, help="the most rows waiting for a free "
                   "one; a request past it is refused with 429 and Retry-After (default: %(default)s)")
    p.add_argument("--max-messages", type=int, default=Limits.max_messages,
                   help="the most messages in a chat request (default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=Limits.request_timeout, metavar="SECONDS",
                   help="a request's rows still decoding this long after it was queued end with \"length\" "
                   "(default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes,
                   help="the largest request body accepted (default: %(default)s)")


def main(args) -> int:
    # The key from the environment, unless the flag gives one: a flag is visible to every user in `ps`.
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    app = create_app(args.run, args.checkpoint, args.device, api_key, args.dtype, max_tokens=args.max_tokens,
                     max_batch=args.max_batch, max_waiting=args.max_waiting, max_messages=args.max_messages,
                     request_timeout=args.request_timeout, max_body_bytes=args.max_body_bytes)
    server, url = app.state.server, f"http://{args.host}:{args.port}"
    print(f"slm: serving {server.model_id} ({server.model.config.block_size}-token context): the chat page at "
          f"{url}/, the OpenAI API at {url}/v1", flush=True)
    if api_key is None and args.host not in LOOPBACK:
        print(f"slm: warning: serving on {args.host} without an API key, so anyone who can reach port {args.port} "
              f"can use the model; set {API_KEY_ENV} (or --api-key)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
