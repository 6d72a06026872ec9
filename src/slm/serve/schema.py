"""What a request to `slm serve` may be: the server's limits (its flags), OpenAI's request bodies with the
bounds that keep one client from holding the server, OpenAI's error shape for a request refused, and the
middleware that refuses a body too large before reading it.

Checked as a body is parsed: at most MAX_STOPS stop strings (OpenAI's limit) of 1 to MAX_STOP_CHARS characters
each, a seed that is an integer in [0, 2^64) (unsigned 64 bits, as torch's generators take), finite numbers.
The server checks the rows and messages before tokenizing, max_tokens and the context with the ids, and its
queue last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator

from slm.errors import SlmError
from slm.inference.sampling import MAX_NEW_TOKENS, MIN_SAMPLING

MAX_STOPS = 4  # as OpenAI's API
MAX_STOP_CHARS = 256
RETRY_AFTER_S = 1  # what a refused client is told to wait, in seconds: rows free as answers end


@dataclass(frozen=True)
class Limits:
    """What one request may ask and how long the server keeps it: the flags of `slm serve`, same names."""

    max_tokens: int = 512  # per choice, and what a request without max_tokens gets
    max_batch: int = 16  # rows decoded at once; n choices take n rows
    max_waiting: int = 64  # rows waiting for a free one beyond max_batch; a request past it is answered 429
    max_messages: int = 1000  # per chat request, counted before any is tokenized
    request_timeout: float = 300.0  # seconds from when a request is queued to when its rows end with "length"
    max_body_bytes: int = 1_000_000

    def check(self) -> None:
        """Raise SlmError naming the flag of the first bad value."""
        if not 1 <= self.max_tokens <= MAX_NEW_TOKENS:
            raise SlmError(f"--max-tokens must be between 1 and {MAX_NEW_TOKENS} (got {self.max_tokens})")
        for name in ("max_batch", "max_messages", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise SlmError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.max_waiting < 0:
            raise SlmError(f"--max-waiting must be at least 0 (got {self.max_waiting}); 0 refuses any request "
                           "that finds every row busy")
        if not self.request_timeout > 0:  # `not >` refuses NaN
            raise SlmError(f"--request-timeout must be more than 0 seconds (got {self.request_timeout})")


class ApiError(Exception):
    """An error answered as OpenAI's {"error": {...}} JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.error_type = status, message, param, code, error_type

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}
        headers = {401: {"WWW-Authenticate": "Bearer"}, 429: {"Retry-After": str(RETRY_AFTER_S)}}.get(self.status)
        return JSONResponse({"error": error}, status_code=self.status, headers=headers)


def generation_failed() -> ApiError:
    return ApiError(500, "generation failed; see the server's log", error_type="server_error")


def busy(waiting: int) -> ApiError:
    """429, as OpenAI answers a client over its rate: the openai client retries after Retry-After itself."""
    return ApiError(429, f"the server is busy: every decoding row is taken and {waiting} more are waiting "
                    f"(slm serve --max-waiting); retry after {RETRY_AFTER_S} s", code="rate_limit_exceeded",
                    error_type="rate_limit_error")


def invalid_body(err: RequestValidationError) -> ApiError:
    """The first problem pydantic found in a body, as a 400 naming the field."""
    first = err.errors()[0]
    if first["type"] == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({first['ctx']['error']})")
    where = [str(part) for part in first["loc"] if part != "body"]
    message = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]  # our own words
    code = "missing_required_parameter" if first["type"] == "missing" else None
    return ApiError(400, f"{'.'.join(where) or 'the body'}: {message}", where[0] if where else None, code)


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # None, here and below: Server.sampling's; NaN fails le
    top_p: float | None = Field(None, ge=MIN_SAMPLING, le=1)
    repetition_penalty: float | None = Field(None, ge=MIN_SAMPLING, le=10)  # not OpenAI's; vLLM's and llama.cpp's name
    word_bias: float | None = Field(None, ge=0, le=100)  # slm's: pushes the words a chat request names
    word_reach: float | None = Field(None, ge=0, le=100)  # slm's: ... only where the model finds them plausible
    dry_multiplier: float | None = Field(None, ge=0, le=100)  # llama.cpp's DRY sampler, its default base and length
    best_of: int | None = Field(None, ge=1, le=16)  # OpenAI's (completions): candidates per choice, the best returned
    n: int = Field(1, ge=1)
    stop: tuple[str, ...] = ()  # OpenAI's string or list of strings, as a tuple
    seed: int | None = Field(None, ge=0, lt=2**64, strict=True)  # strict: "7", 7.0 and true are not seeds
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("temperature")
    @classmethod
    def _greedy_or_sampled(cls, temperature: float | None) -> float | None:
        if temperature and temperature < MIN_SAMPLING:
            raise ValueError(f"{temperature} is too small to sample with; give 0 (greedy) or at least {MIN_SAMPLING:f}")
        return temperature

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, stop: Any) -> tuple[str, ...]:
        stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("give a string or a list of strings")
        if len(stops) > MAX_STOPS:
            raise ValueError(f"{len(stops)} stop strings; at most {MAX_STOPS} are allowed")
        for s in stops:
            if not 1 <= len(s) <= MAX_STOP_CHARS:  # every text contains the empty string
                raise ValueError(f"a stop string has {len(s)} characters; each must have 1 to {MAX_STOP_CHARS}")
        return tuple(stops)


class CompletionRequest(Sampling):
    prompt: str | list[str]

    @property
    def rows(self) -> int:
        return (1 if isinstance(self.prompt, str) else len(self.prompt)) * self.n


class ChatRequest(Sampling):
    messages: list[Any]  # checked by template.check_messages, which names the bad message
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens in OpenAI's chat API

    @property
    def rows(self) -> int:
        return self.n


class BodyLimit:
    """ASGI middleware refusing POST bodies over max_bytes before they are read. uvicorn reads exactly
    Content-Length bytes, so the header bounds what is read; a body without one is refused."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            length = dict(scope["headers"]).get(b"content-length", b"")
            error = None
            if not length.isdigit():
                error = ApiError(411, "send the request body with a Content-Length header")
            elif int(length) > self.max_bytes:
                error = ApiError(413, f"the request body has {int(length)} bytes; this server takes at most "
                                 f"{self.max_bytes} (slm serve --max-body-bytes)")
            if error:
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)
