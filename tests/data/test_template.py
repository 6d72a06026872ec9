import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CONVERSATIONS
from slm.data.template import (CHAT_TEMPLATE_JINJA, MARKERS, conversation_ids, fit_context, read_conversations, render,
                               render_text, rendered_length)
from slm.data.tokenizer import EOT_ID, EOT_TOKEN, get_tokenizer, vocab_files
from slm.errors import SlmError


def runs_of(ids, mask):
    """The maximal runs of consecutive ids whose mask is True."""
    runs, current = [], []
    for token, learn in zip(ids, mask):
        if learn:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_the_loss_mask_covers_exactly_the_assistant_contents_and_their_end_of_text():
    tokenizer = get_tokenizer()
    messages = CONVERSATIONS[1]
    ids, mask = render(messages)
    assert len(ids) == len(mask)
    expected = [tokenizer.encode(m["content"].strip()) + [EOT_ID] for m in messages if m["role"] == "assistant"]
    assert runs_of(ids, mask) == expected
    unmasked = tokenizer.decode([t for t, learn in zip(ids, mask) if not learn])
    assert unmasked == ("<|system|>\nYou tell short stories.\n<|user|>\nTell me about a cat.\n<|assistant|>\n"
                        "<|user|>\nAnd then?\n<|assistant|>\n")


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_a_rendered_conversation_decodes_to_the_template_text_and_encodes_back_to_its_ids(messages):
    tokenizer = get_tokenizer()
    ids, _ = render(messages)
    text = render_text(messages)
    assert tokenizer.decode(ids) == text
    # Tokenizing the whole text at once, as Hugging Face's apply_chat_template does, gives the same ids.
    assert tokenizer.encoding.encode(text, allowed_special={EOT_TOKEN}) == ids


def test_the_template_text_is_the_documented_one():
    assert render_text(CONVERSATIONS[0], add_generation_prompt=True) == (
        "<|user|>\nHi!\n<|assistant|>\nHello. How can I help?<|endoftext|><|assistant|>\n")
    ids = conversation_ids(CONVERSATIONS[0][:1])
    assert get_tokenizer().decode(ids) == "<|user|>\nHi!\n<|assistant|>\n"
    assert ids[-len(get_tokenizer().encode(MARKERS["assistant"])):] == get_tokenizer().encode(MARKERS["assistant"])


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_the_jinja_template_renders_exactly_the_python_text(add_generation_prompt):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # The environment Hugging Face's apply_chat_template renders chat templates in.
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(CHAT_TEMPLATE_JINJA)
    for messages in CONVERSATIONS:
        assert (template.render(messages=messages, add_generation_prompt=add_generation_prompt)
                == render_text(messages, add_generation_prompt))


def test_hugging_face_tokenizer_with_the_template_gives_the_same_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab_bpe, encoder_json = vocab_files()
    shutil.copy(encoder_json, tmp_path / "vocab.json")
    shutil.copy(vocab_bpe, tmp_path / "merges.txt")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "eos_token": EOT_TOKEN, "chat_template": CHAT_TEMPLATE_JINJA}))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for messages in CONVERSATIONS:
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert hf(text, add_special_tokens=False)["input_ids"] == conversation_ids(messages)


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_alpaca_rows_become_a_user_and_an_assistant_message(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Name a color.", "input": "", "output": "Blue."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"messages": CONVERSATIONS[0]},
    ])
    assert read_conversations(path) == [
        [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}],
        [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}],
        CONVERSATIONS[0],
    ]


@pytest.mark.parametrize("row, message", [
    ("{not json", "line 2 is not JSON"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "message 1 has role 'bot'"),
    ({"messages": [{"role": "user", "content": 3}]}, "message 1 (user) has no text"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "only the first"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"instruction": "x", "output": ["y"]}, "'output' holds a list"),
    ({"prompt": "x", "completion": "y"}, "expected {\"messages\""),
])
def test_bad_rows_raise_a_one_line_error_with_the_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CONVERSATIONS[0]}, row])
    with pytest.raises(SlmError, match="line 2") as err:
        read_conversations(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_fit_context_drops_the_oldest_turns_but_keeps_the_system_message():
    system = {"role": "system", "content": "Be brief."}
    turns = [{"role": role, "content": f"{role} message number {i}"}
             for i in range(6) for role in ("user", "assistant")]
    messages = [system, *turns, {"role": "user", "content": "last question"}]
    fitted = fit_context(messages, max_tokens=60)
    assert fitted[0] == system and fitted[-1] == messages[-1] and fitted[1]["role"] == "user"
    one_more_turn = [system, *messages[-(len(fitted) - 1) - 2:]]
    assert len(conversation_ids(fitted)) <= 60 < len(conversation_ids(one_more_turn))
    assert fit_context(messages, max_tokens=1) == [system, messages[-1]]  # the newest message is always kept
    assert fit_context(messages, max_tokens=10_000) == messages


def slow_fit_context(messages, max_tokens):
    """fit_context's obvious twin: the whole conversation rendered again for every turn it drops."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    while len(rest) > 1 and len(conversation_ids(system + rest)) > max_tokens:
        rest = rest[1:]
        while len(rest) > 1 and rest[0]["role"] != "user":
            rest = rest[1:]
    return system + rest


# Contents with what moves GPT-2's token boundaries: empty and blank messages, runs of spaces and newlines,
# a "<" or "|" next to the markers, contractions, other scripts.
CONTENT = st.lists(st.sampled_from(["", " ", "  ", "\n", "\n\n", "\t", "<", "|", ">", "<|user|>", "'s", "a", "Tom",
                                    "9", ".", "é", "🙂", "<|endoftext|>"]), max_size=8).map("".join)
MESSAGES = st.tuples(st.booleans(), CONTENT, st.lists(st.tuples(st.sampled_from(["user", "assistant"]), CONTENT),
                                                      min_size=1, max_size=8))


@settings(max_examples=300, deadline=None)
@given(MESSAGES, st.integers(0, 80))
def test_fit_context_counts_what_rendering_gives_and_keeps_what_its_slow_twin_keeps(conversation, limit):
    with_system, system, turns = conversation
    messages = [{"role": "system", "content": system}] * with_system + [{"role": r, "content": c} for r, c in turns]
    generation_prompt = len(get_tokenizer().encode(MARKERS["assistant"]))
    assert sum(map(rendered_length, messages)) + generation_prompt == len(conversation_ids(messages))
    assert fit_context(messages, limit) == slow_fit_context(messages, limit)


def test_fit_context_tokenizes_each_message_once(monkeypatch):
    tokenizer = get_tokenizer()
    encode, encoded = type(tokenizer).encode, []
    monkeypatch.setattr(type(tokenizer), "encode", lambda self, text: encoded.append(len(text)) or encode(self, text))
    turns = [{"role": ("user", "assistant")[i % 2], "content": f"message number {i}"} for i in range(400)]
    fitted = fit_context(turns, max_tokens=100)
    assert len(fitted) < 20
    assert sum(encoded) < 2 * len(render_text(turns))  # each message once, plus a marker (re-rendering: ~200x)
