"""The worker of `slm serve`: one thread owns the model and its running batch (inference.engine.Engine).

Request handlers put jobs on its inbox and await their text on an asyncio queue, so the event loop never
waits for the model. A request arriving mid-decode joins the running batch at the next step, each row with its
own settings, stop strings, max_tokens and seed (choice i of a request with `seed` samples with seed + i, on its
own generator, so its text does not depend on what else is decoding); a finished row, or one whose request has
gone, leaves at once. At most --max-batch rows decode at once; later requests wait in arrival order.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from slm.assistant import following
from slm.data.tokenizer import Tokenizer
from slm.inference.engine import Engine, TextDelta
from slm.inference.sampling import SamplingSettings
from slm.model.gpt import GPT

log = logging.getLogger("slm.serve")
TIME_UP = object()  # what a job's queue gets at its deadline
T = TypeVar("T")


def on_passing_thread(call: Callable[[], T]) -> T:
    """call() on a thread that ends with it. OpenMP keeps a thread pool per thread that ran a parallel op; a
    pool left on the main thread beside the worker's outnumbers the cores and libgomp then wakes threads for
    every op: best of 4 took 3.7 s a story against 1.8 s on 2 cores (benchmarks/assistant.md, part 7)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as passing:
        return passing.submit(call).result()


@dataclass(eq=False)
class Job:
    """One request's choices (each prompt n times) and the queue their TextDeltas go to, row = choice index.
    Each choice decodes settings.best_of candidate rows; with more than one, or a requested last sentence,
    its text is sent whole once chosen (following.best), as OpenAI's best_of does not stream either."""

    prompts: list[list[int]]
    settings: SamplingSettings
    seed: int | None
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic() when its rows end (slm serve --request-timeout)
    plan: following.Plan = following.Plan({}, [])  # what a chat asks (following.plan); a completion asks nothing
    deltas: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set once nobody reads its deltas: answered, or its client has gone
    admitted: bool = False  # its rows have joined the running batch
    # per choice, its candidates' text and last delta so far, while they decode (whole answers only)
    candidates: dict[int, dict[int, tuple[str, TextDelta | None]]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.settings.best_of

    def send(self, item: TextDelta | Exception) -> None:
        self.loop.call_soon_threadsafe(self.deltas.put_nowait, item)

    def gone(self) -> bool:
        """Whether the job's text is of no more use: the worker drops its rows, the queue no longer counts it."""
        return self.cancelled or time.monotonic() >= self.deadline


class Worker:
    """The thread that owns the model and its running batch: between two decoding steps it drops the rows of
    requests gone, admits waiting requests while rows are free, and sends each delta to its request."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, max_batch: int) -> None:
        self.engine = Engine(model, tokenizer, max_batch)
        self.inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()  # None asks the thread to end
        self.thread = threading.Thread(target=self._run, name="slm-serve-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join()

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    @staticmethod
    async def results(job: Job) -> AsyncIterator[TextDelta]:
        """A submitted job's deltas as the worker sends them, until every row has its finish reason. At the
        job's deadline, rows still decoding end where they are with "length", as llama.cpp's server ends one
        past its time limit; a choice answered whole gets the best of what its candidates wrote by then, which
        the worker sends after its current step (Worker._end_late)."""
        tokens = dict.fromkeys(range(len(job.prompts)), 0)  # per row not finished, the ids it has generated
        # A marker queued at the deadline, not asyncio.wait_for around each get: before Python 3.12, wait_for
        # swallows a cancellation that meets a delta just arrived, so a client's leaving could go unnoticed.
        timer = job.loop.call_later(max(job.deadline - time.monotonic(), 0), job.deltas.put_nowait, TIME_UP)
        try:
            while tokens:
                item = await job.deltas.get()
                if item is TIME_UP and job.plan.answered_whole(job.settings):
                    continue
                if item is TIME_UP:
                    for row, count in sorted(tokens.items()):
                        yield TextDelta(row, "", count, "length")
                    return
                if isinstance(item, Exception):
                    raise item
                if item.finish_reason:
                    del tokens[item.row]
                else:
                    tokens[item.row] = item.tokens
                yield item
        finally:
            timer.cancel()
            job.cancelled = True

    def _run(self) -> None:
        engine, waiting = self.engine, collections.deque()
        while True:
            # Idle, sleep until a request comes; busy, take what arrived during the last step without waiting.
            arrived = [self.inbox.get()] if not engine.rows and not waiting else []
            while not self.inbox.empty():
                arrived.append(self.inbox.get())
            if None in arrived:
                return
            late = {job for job in [*waiting, *arrived] if job.gone()} | {row.owner[0] for row in engine.rows
                                                                       if row.owner[0].gone()}
            waiting = collections.deque(job for job in [*waiting, *arrived] if job not in late)  # some left waiting
            for job in late:
                self._guard(self._end_late, job)
            for row in [row for row in engine.rows if row.owner[0] in late]:
                engine.remove(row)
            # In arrival order, so a request asking for many rows is not starved by later, smaller ones.
            while waiting and waiting[0].rows <= engine.max_rows - len(engine.rows):
                self._guard(self._admit, waiting.popleft())
            if engine.rows:
                self._guard(self._step)

    def _admit(self, job: Job) -> None:
        """The job's rows join the running batch. Row r of a seeded request (choice r // best_of) samples with
        seed + r, on a generator of its own, so its text is the same whatever else is decoding."""
        plan, best_of = job.plan, job.settings.best_of
        job.admitted = True
        for choice, ids in enumerate(job.prompts):
            if plan.starts and not plan.answered_whole(job.settings):
                job.send(TextDelta(choice, plan.starts, 0))
            job.candidates[choice] = {}
            for candidate in range(best_of):
                row = choice * best_of + candidate
                seed = None if job.seed is None else (job.seed + row) % 2**64
                plan.add_candidate(self.engine, ids, job.settings, candidate, (job, choice, candidate), seed)

    def _step(self) -> None:
        for row, delta in self.engine.step():
            job, choice, candidate = row.owner
            if job.gone():
                continue
            if not job.plan.answered_whole(job.settings):
                job.send(dataclasses.replace(delta, row=choice))
                continue
            texts = job.candidates[choice]
            texts[candidate] = (texts.get(candidate, ("", None))[0] + delta.text, delta)
            if len(texts) == job.settings.best_of and all(d.finish_reason for _, d in texts.values()):
                self._send_chosen(job, choice)

    def _send_chosen(self, job: Job, choice: int, reason: str | None = None) -> None:
        """The best of a choice's candidates, as one delta with every candidate's tokens; the choice is done.
        `reason`: the finish reason where the candidates did not all finish (the job's time is up)."""
        candidates = [job.candidates[choice].get(c, ("", None)) for c in range(job.settings.best_of)]
        kept, text = following.best(self.engine.model, self.engine.tokenizer, job.plan, [t for t, _ in candidates])
        job.send(TextDelta(choice, text, sum(d.tokens for _, d in candidates if d),
                           reason or candidates[kept][1].finish_reason))
        del job.candidates[choice]

    def _end_late(self, job: Job) -> None:
        """A job whose time is up while its client waits, answered whole: each choice not yet sent gets the
        best of what its candidates wrote so far (empty for a job that never got rows), ending with "length"."""
        if job.cancelled or not job.plan.answered_whole(job.settings):
            return
        for choice in range(len(job.prompts)):
            if choice in job.candidates:
                self._send_chosen(job, choice, "length")
            elif not job.admitted:
                job.send(TextDelta(choice, "", 0, "length"))  # it waited for rows all its time

    def _guard(self, call, *args) -> None:
        """call(*args); an exception (a bug: requests are checked before they get here) fails the jobs with
        rows in the batch, or the one being admitted, and empties the batch."""
        try:
            call(*args)
        except Exception as err:
            log.exception("generation failed")
            for job in {row.owner[0] for row in self.engine.rows} | set(args):
                job.send(err)
            self.engine.rows.clear()
