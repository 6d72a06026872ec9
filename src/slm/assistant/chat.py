"""`slm chat`: a conversation with a model in the terminal, or one answer per input line when stdin is not one;
each answer follows the newest request (following.py) as `slm serve` and `slm eval-assistant` do."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

import torch

from slm.assistant import following
from slm.config import add_checkpoint_choice, add_placement
from slm.data.template import Message, check_messages, conversation_ids, fit_for_answer
from slm.data.tokenizer import get_tokenizer
from slm.device import pick_device, pick_dtype
from slm.errors import SlmError
from slm.inference.engine import stream
from slm.inference.sampling import (DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, RUN_SAMPLING, SamplingSettings,
                                    add_sampling_flags, make_generator, read_sampling)
from slm.model.gpt import GPT
from slm.runs.checkpoint import checkpoint_dir, load_model


class ChatSession:
    """A conversation with a model: the history, the sampling settings, and streamed answers."""

    def __init__(self, model: GPT, system: str | None, settings: SamplingSettings,
                 generator: torch.Generator | None = None) -> None:
        self.model, self.system, self.settings, self.generator = model, system, settings, generator
        self.messages: list[Message] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def answer(self, messages: list[Message]) -> Iterator[str]:
        """Stream the text of the next assistant message, which ends at end-of-text. The prompt leaves room
        for an answer of up to half the context; a longer one slides the window over its own beginning."""
        fitted = fit_for_answer(messages, self.model.config.block_size, self.settings.max_new_tokens)
        tokenizer = get_tokenizer()
        plan = following.plan(tokenizer, messages)
        if plan.answered_whole(self.settings):
            yield following.answers(self.model, tokenizer, [conversation_ids(fitted)], [plan], self.settings,
                                    self.generator)[0].text
            return
        yield plan.starts
        for delta in stream(self.model, tokenizer, [conversation_ids(fitted) + plan.start_ids], self.settings,
                            self.generator, [plan.words], written=len(plan.start_ids), lengths=[plan.length]):
            yield delta.text

    def say(self, text: str) -> Iterator[str]:
        """Add a user message, stream the answer, and keep both in the history."""
        self.messages.append({"role": "user", "content": text})
        pieces = []
        for piece in self.answer(self.messages):
            pieces.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(pieces)})


HELP = "commands: /reset (forget the conversation), /temperature X (0 = greedy), /exit (or Ctrl-D)"


def chat_loop(session: ChatSession, lines: Iterable[str], out: TextIO) -> None:
    """The interactive chat: each line is a message to answer, or a command."""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        command, _, value = line.partition(" ")
        if command == "/exit":
            return
        if command == "/reset":
            session.reset()
            print("(the conversation is cleared)", file=out)
        elif command == "/temperature":
            try:
                settings = dataclasses.replace(session.settings, temperature=float(value))
                settings.check(session.model.config.vocab_size)
            except (ValueError, SlmError) as err:
                print(f"(/temperature needs a number >= 0: {err})", file=out)
                continue
            session.settings = settings
            print(f"(temperature {settings.temperature:g})", file=out)
        elif command.startswith("/"):
            print(f"(unknown command {command}; {HELP})", file=out)
        else:
            for piece in session.say(line):
                out.write(piece)
                out.flush()
            out.write("\n\n")


def answer_lines(session: ChatSession, lines: Iterable[str], out: TextIO) -> None:
    """Scripted use: each input line is one conversation, a user message or a JSON list of messages; its
    answer is written on one output line (line breaks inside the answer become spaces)."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("["):
            try:
                messages = check_messages(json.loads(line), f"stdin line {number}")
            except json.JSONDecodeError as err:
                raise SlmError(f"stdin line {number} starts with '[' but is not JSON ({err.msg})") from None
        else:
            messages = [{"role": "user", "content": line.strip()}]
        if session.system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": session.system}, *messages]
        answer = "".join(session.answer(messages))
        out.write(" ".join(answer.split("\n")).strip() + "\n")
        out.flush()


def _typed_lines() -> Iterator[str]:
    while True:
        try:
            yield input("> ")
        except EOFError:
            return


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_choice(p)
    add_placement(p)
    p.add_argument("--system", default=None, help="a system message that starts every conversation")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help="the most new tokens per answer (default: %(default)s)")
    add_sampling_flags(p, {"top_k": None})
    add_sampling_flags(p, {"temperature": DEFAULT_TEMPERATURE, "top_p": 1, "repetition_penalty": 1, "word_bias": 0,
                           "word_reach": 0, "dry_multiplier": 0, "best_of": 1}, from_run=True)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling; the same seed gives the same answers")


def main(args) -> int:
    device = pick_device(args.device)
    folder = checkpoint_dir(args.run, args.checkpoint)
    model, cfg, _ = load_model(folder, device, pick_dtype(args.dtype, device))
    # The run's own sampling (RUN/sampling.json) where no flag is given, else the defaults of every command.
    given = {key: getattr(args, key) for key in RUN_SAMPLING if getattr(args, key) is not None}
    settings = SamplingSettings(top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                                **{"temperature": DEFAULT_TEMPERATURE, **read_sampling(args.run), **given})
    settings.check(cfg.model.vocab_size)
    session = ChatSession(model, args.system, settings, make_generator(device, args.seed))
    if sys.stdin.isatty():
        print(f"chatting with {folder} (context {cfg.model.block_size} tokens); {HELP}", file=sys.stderr)
        chat_loop(session, _typed_lines(), sys.stdout)
    else:
        answer_lines(session, sys.stdin, sys.stdout)
    return 0
