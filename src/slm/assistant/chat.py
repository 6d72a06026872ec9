"""The chat template, chat data, supervised fine-tuning batches, and `slm chat`.

One template, used by fine-tuning, `slm chat`, `slm serve` and the Hugging Face export:

    <|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{answer}<|endoftext|><|user|>\\n...

Role markers are plain text, not new special tokens. "<|user|>\\n" is six ordinary GPT-2 tokens
(`<`, `|`, `user`, `|`, `>`, newline), so the vocabulary stays at GPT-2's 50,257 ids: the model, the
Hugging Face and GGUF exports and every tool that knows GPT-2 need no change, and a base model can be
prompted with the template at once. Special tokens would save a few tokens per turn but need new embedding
rows, which a fine-tune on little data learns poorly, and a custom tokenizer on export. The `<|role|>` shape
is Zephyr's, so it is unlikely in ordinary text and easy for a reader to spot. An assistant turn ends with
GPT-2's end-of-text id (50256), the token a base model already emits at the end of each document, so
"stop at end-of-text" is the end of a turn; other turns end with a newline before the next marker.

Leading and trailing whitespace of a message is not part of the template (the Jinja twin applies `trim`).
`render` tokenizes pieces separately, to know which tokens are the assistant's: the template text up to an
assistant's content, the content, and the end-of-text id. A stripped content starts and ends with a
non-space character, so every boundary falls on a GPT-2 pre-tokenizer boundary and the ids equal those of
the whole text tokenized at once, as Hugging Face's `apply_chat_template` does. slm encodes message text as
ordinary text: a literal "<|endoftext|>" inside a message stays text here, while Hugging Face would read
it as the special id.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from slm.assistant import following
from slm.training import distributed
from slm.runs.checkpoint import checkpoint_dir, load_model
from slm.config import Config, add_checkpoint_choice, add_placement
from slm.device import pick_device, pick_dtype
from slm.training.distributed import World
from slm.errors import SlmError
from slm.inference.engine import stream
from slm.inference.sampling import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, SamplingSettings, make_generator
from slm.model.gpt import GPT, IGNORE_INDEX
from slm.runs.files import read_sampling
from slm.data.tokenizer import EOT_ID, EOT_TOKEN, get_tokenizer

ROLES = ("system", "user", "assistant")
MARKERS = {role: f"<|{role}|>\n" for role in ROLES}
# The same template for Hugging Face's tokenizer_config.json "chat_template"; tests check that both agree.
CHAT_TEMPLATE_JINJA = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' + (message['content'] | trim) -}}"
    "{%- if message['role'] == 'assistant' -%}{{- '<|endoftext|>' -}}{%- else -%}{{- '\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

Message = dict[str, str]  # {"role": one of ROLES, "content": text}


# ---- the template -----------------------------------------------------------------------------------

def render_text(messages: list[Message], add_generation_prompt: bool = False) -> str:
    """The conversation as text; with add_generation_prompt it ends with the assistant marker."""
    text = "".join(MARKERS[m["role"]] + m["content"].strip() + (EOT_TOKEN if m["role"] == "assistant" else "\n")
                   for m in messages)
    return text + (MARKERS["assistant"] if add_generation_prompt else "")


def render(messages: list[Message], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """(ids, mask) of render_text's text: mask is True on the tokens the model must learn to produce, each
    assistant message's content and the end-of-text id that closes it; False on the markers and on the
    system and user messages."""
    tokenizer = get_tokenizer()
    ids: list[int] = []
    mask: list[bool] = []

    def add(piece: list[int], learn: bool) -> None:
        ids.extend(piece)
        mask.extend([learn] * len(piece))

    # Markers and system and user messages up to an assistant's content make one piece: an empty message
    # would otherwise end a piece in whitespace ("\n\n"), which GPT-2 splits differently when "<" follows.
    pending = ""
    for m in messages:
        if m["role"] == "assistant":
            add(tokenizer.encode(pending + MARKERS["assistant"]), False)
            add(tokenizer.encode(m["content"].strip()) + [EOT_ID], True)
            pending = ""
        else:
            pending += MARKERS[m["role"]] + m["content"].strip() + "\n"
    add(tokenizer.encode(pending + (MARKERS["assistant"] if add_generation_prompt else "")), False)
    return ids, mask


def conversation_ids(messages: list[Message]) -> list[int]:
    """The ids to generate the next assistant message from: the conversation, then the assistant marker."""
    return render(messages, add_generation_prompt=True)[0]


def fit_context(messages: list[Message], max_tokens: int) -> list[Message]:
    """Drop the oldest turns, never the system message nor the newest message, until the prompt fits in
    max_tokens. A newest message that alone is too long is kept; generation then sees its last tokens.
    Each message is tokenized once, so the work is linear in the conversation (re-rendering the whole
    conversation for each dropped message was quadratic: 1,600 messages took over a second)."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    lengths = [rendered_length(m) for m in rest]
    total = sum(map(rendered_length, system)) + sum(lengths) + len(get_tokenizer().encode(MARKERS["assistant"]))
    start = 0
    while len(rest) - start > 1 and total > max_tokens:
        end = start + 1
        while len(rest) - end > 1 and rest[end]["role"] != "user":  # whole turns: a history starts with a question
            end += 1
        total -= sum(lengths[start:end])
        start = end
    return system + rest[start:]


def rendered_length(message: Message) -> int:
    """The number of ids `render` gives a message inside a conversation. The next piece of the template
    always starts with a marker's "<", before which GPT-2's pre-tokenizer splits whatever precedes it, so a
    message's ids are those of its text followed by "<", less the one id of "<"; an assistant's content is
    tokenized on its own and closed by end-of-text."""
    tokenizer, content = get_tokenizer(), message["content"].strip()
    if message["role"] == "assistant":
        return len(tokenizer.encode(MARKERS["assistant"])) + len(tokenizer.encode(content)) + 1
    return len(tokenizer.encode(MARKERS[message["role"]] + content + "\n<")) - 1


# ---- reading conversations --------------------------------------------------------------------------

def fit_for_answer(messages: list[Message], block_size: int, max_new_tokens: int) -> list[Message]:
    """The conversation with its oldest turns dropped so that an answer of max_new_tokens, up to half the
    context, fits after it; a longer answer slides the window over its own beginning."""
    return fit_context(messages, block_size - min(max_new_tokens, block_size // 2))


def check_messages(messages: Any, where: str) -> list[Message]:
    """A list of {"role", "content"} dicts with a known role and text content, a system message only first."""
    if not isinstance(messages, list) or not messages:
        raise SlmError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    for number, m in enumerate(messages, 1):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise SlmError(f"{where}: message {number} has role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise SlmError(f"{where}: message {number} ({m['role']}) has no text \"content\"")
        if m["role"] == "system" and number > 1:
            raise SlmError(f"{where}: message {number} is a system message; only the first message may be one")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def row_messages(row: Any, where: str) -> list[Message]:
    """The messages of one data row: {"messages": [...]}, or Alpaca's {"instruction", "input", "output"}
    (a non-empty input follows the instruction after a blank line, as in Alpaca's own prompt)."""
    if isinstance(row, dict) and "messages" in row:
        messages = check_messages(row["messages"], where)
    elif isinstance(row, dict) and "instruction" in row and "output" in row:
        fields = {key: row.get(key) or "" for key in ("instruction", "input", "output")}
        for key, value in fields.items():
            if not isinstance(value, str):
                raise SlmError(f"{where}: Alpaca field {key!r} holds a {type(value).__name__}, not text")
        question = fields["instruction"].strip() + (f"\n\n{fields['input'].strip()}" if fields["input"].strip() else "")
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": fields["output"]}]
    else:
        raise SlmError(f"{where}: expected {{\"messages\": [...]}} or Alpaca's {{\"instruction\", \"output\"}}")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise SlmError(f"{where}: no assistant message with content, so nothing to learn from")
    return messages


def read_conversations(path: str | Path) -> list[list[Message]]:
    """Every conversation of a JSONL file of chat or Alpaca rows (blank lines skipped)."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise SlmError(f"cannot read {path}: chat data is a .jsonl file, one conversation per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SlmError(f"chat data file {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise SlmError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    conversations = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SlmError(f"{path} line {number} is not JSON ({err.msg}); write one JSON object per line") from None
        conversations.append(row_messages(row, f"{path} line {number}"))
    if not conversations:
        raise SlmError(f"{path} holds no conversations")
    return conversations


# ---- supervised fine-tuning batches -----------------------------------------------------------------

@dataclass(frozen=True)
class SftData:
    """Conversations rendered and packed into one stream, and the windows training reads from it."""

    ids: np.ndarray     # (N,) every conversation's ids, one after another
    mask: np.ndarray    # (N,) True where the token is one the model must learn to produce
    # (W,) window offsets: each conversation tiled every block_size tokens from its start, keeping the tiles
    # whose targets include some of that conversation's own assistant tokens
    starts: np.ndarray


def pack(conversations: list[list[Message]], block_size: int) -> SftData:
    rendered = [render(messages) for messages in conversations]
    ids = np.array([i for r in rendered for i in r[0]], dtype=np.int64)
    mask = np.array([m for r in rendered for m in r[1]], dtype=bool)
    learned = np.concatenate([[0], np.cumsum(mask)])  # learned[b] - learned[a]: assistant tokens in [a, b)
    starts, offset = [], 0
    for conversation_ids, _ in rendered:
        end = offset + len(conversation_ids)
        # The tile at s predicts tokens s+1 .. s+block_size; tiling every block_size predicts each once.
        starts += [s for s in range(offset, end - 1, block_size)
                   if learned[min(s + block_size + 1, end)] > learned[s + 1]]
        offset = end
    return SftData(ids, mask, np.array(starts, dtype=np.int64))


def masked_windows(data: SftData, starts: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (B, block_size) = window[:-1] and targets = window[1:], IGNORE_INDEX wherever the target is
    not an assistant token. A window runs on into the next conversations (packing); at the end of the
    stream it wraps to the start, where a conversation begins too."""
    offsets = starts[:, None] + np.arange(block_size + 1)  # (B, block_size + 1)
    ids = np.take(data.ids, offsets, mode="wrap")
    learn = np.take(data.mask, offsets, mode="wrap")
    return ids[:, :-1], np.where(learn[:, 1:], ids[:, 1:], IGNORE_INDEX)


class SftBatches:
    """Windows of the packed conversations for train.train; like pretraining's, step s's global batch is a
    pure function of (seed, step), so a run is reproducible and needs no sampler state."""

    def __init__(self, data: SftData, cfg: Config, device: torch.device, world: World = World()) -> None:
        self.data, self.cfg, self.device, self.world = data, cfg, device, world

    def __call__(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This process's micro-batches: its slice of the global batch."""
        t = self.cfg.train
        rng = np.random.default_rng((t.seed, step))
        starts = self.data.starts[rng.integers(0, len(self.data.starts), size=t.batch_size)]
        return distributed.micro_batches(distributed.share(starts, self.world), t.micro_batch_size, self.window)

    def first(self, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first `count` micro-batches of windows, in order: a fixed set for every evaluation to score."""
        t = self.cfg.train
        starts = self.data.starts[:count * t.micro_batch_size]
        return distributed.micro_batches(starts, t.micro_batch_size, self.window)

    def window(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = masked_windows(self.data, starts, self.cfg.model.block_size)
        return torch.from_numpy(inputs).to(self.device), torch.from_numpy(targets).to(self.device)


# ---- answering --------------------------------------------------------------------------------------

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
                            self.generator, [plan.words], written=len(plan.start_ids)):
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
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy; higher = more random "
                   f"(default: the run's sampling.json, else {DEFAULT_TEMPERATURE})")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely ids")
    p.add_argument("--top-p", type=float, default=None, help="sample only among the most likely ids whose "
                   "probability reaches p (default: the run's sampling.json, else 1, all)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="above 1, ids already in the prompt "
                   "or the output get less likely (default: the run's sampling.json, else 1, none)")
    p.add_argument("--word-bias", type=float, default=None, help="added to the logits of the words a request "
                   "names until the answer uses each (default: the run's sampling.json, else 0)")
    p.add_argument("--word-reach", type=float, default=None, help="push a requested word only where its logit "
                   "is within this much of the best (default: the run's sampling.json, else 0, everywhere)")
    p.add_argument("--dry-multiplier", type=float, default=None, help="DRY: ids that would go on repeating the "
                   "answer's own text lose this much of their logit, growing with the repeat's length (default: the "
                   "run's sampling.json, else 0, none)")
    p.add_argument("--best-of", type=int, default=None, help="answers decoded per message, of which the one that "
                   "best follows it is shown, once chosen (default: the run's sampling.json, else 1)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling; the same seed gives the same answers")


def main(args) -> int:
    device = pick_device(args.device)
    folder = checkpoint_dir(args.run, args.checkpoint)
    model, cfg, _ = load_model(folder, device, pick_dtype(args.dtype, device))
    # The run's own sampling (RUN/sampling.json) where no flag is given, else the defaults of every command.
    given = {key: getattr(args, key) for key in ("temperature", "top_p", "repetition_penalty", "word_bias",
                                                 "word_reach", "dry_multiplier", "best_of") if getattr(args, key) is not None}
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
