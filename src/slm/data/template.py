"""The chat template, and chat data read from JSONL files of chat or Alpaca rows.

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

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slm.data.tokenizer import EOT_ID, EOT_TOKEN, get_tokenizer
from slm.errors import SlmError

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


def fit_for_answer(messages: list[Message], block_size: int, max_new_tokens: int) -> list[Message]:
    """The conversation with its oldest turns dropped so that an answer of max_new_tokens, up to half the
    context, fits after it; a longer answer slides the window over its own beginning."""
    return fit_context(messages, block_size - min(max_new_tokens, block_size // 2))



# ---- reading conversations --------------------------------------------------------------------------

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


def jsonl_rows(path: Path, missing: str) -> Iterator[tuple[str, Any]]:
    """(where, row) of each line of a JSONL file but blank ones, `where` naming the file and line for an error;
    `missing` is the error when there is no such file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SlmError(missing) from None
    except UnicodeDecodeError as err:
        raise SlmError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield f"{path} line {number}", json.loads(line)
        except json.JSONDecodeError as err:
            raise SlmError(f"{path} line {number} is not JSON ({err.msg}); write one JSON object per line") from None


def read_conversations(path: str | Path) -> list[list[Message]]:
    """Every conversation of a JSONL file of chat or Alpaca rows (blank lines skipped)."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise SlmError(f"cannot read {path}: chat data is a .jsonl file, one conversation per line")
    missing = f"chat data file {path} does not exist"
    conversations = [row_messages(row, where) for where, row in jsonl_rows(path, missing)]
    if not conversations:
        raise SlmError(f"{path} holds no conversations")
    return conversations
