import io
import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slm.assistant.chat import (CHAT_TEMPLATE_JINJA, MARKERS, ChatSession, SftBatches, answer_lines, chat_loop, fit_context,
                      masked_windows, pack, conversation_ids, read_conversations, render, render_text,
                      rendered_length)
from slm.runs.checkpoint import checkpoint_dir, load_model
from slm.cli import main
from slm.config import ModelConfig, resolve
from slm.errors import SlmError
from slm.inference.sampling import SamplingSettings
from slm.model.gpt import GPT, IGNORE_INDEX
from slm.data.tokenizer import EOT_ID, EOT_TOKEN, get_tokenizer, vocab_files

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"}],
    [{"role": "system", "content": "You tell short stories."},
     {"role": "user", "content": "  Tell me about a cat.\n"},
     {"role": "assistant", "content": "Once upon a time, there was a cat named Tom.\nHe liked milk. "},
     {"role": "user", "content": "And then?"},
     {"role": "assistant", "content": "Then he slept, 100% happy. \u00e9t\u00e9 \U0001F600"}],
    [{"role": "user", "content": "'s odd: it starts with a contraction"}, {"role": "assistant", "content": "'ll do"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}, {"role": "user", "content": "x"}],
]


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


def test_sft_targets_are_ignore_index_wherever_the_target_is_not_an_assistant_token():
    data = pack(CONVERSATIONS * 3, block_size=16)
    x, y = masked_windows(data, data.starts, 16)
    offsets = data.starts[:, None] + np.arange(17)
    ids, learn = np.take(data.ids, offsets, mode="wrap"), np.take(data.mask, offsets, mode="wrap")
    assert np.array_equal(x, ids[:, :-1])
    assert np.array_equal(y[learn[:, 1:]], ids[:, 1:][learn[:, 1:]])
    assert (y[~learn[:, 1:]] == IGNORE_INDEX).all()
    assert ((y != IGNORE_INDEX).sum(axis=1) > 0).all()  # no window without a token to learn: no NaN loss


def test_a_conversation_longer_than_the_context_is_tiled_so_each_assistant_token_is_a_target_once():
    long = [{"role": "user", "content": "Tell me a long story. " * 10},
            {"role": "assistant", "content": "One day a dog ran. " * 12}]
    data = pack([long], block_size=8)
    ids, mask = render(long)
    predicted = np.concatenate([s + 1 + np.arange(8) for s in data.starts])
    predicted = predicted[predicted < len(ids)]
    assert sorted(predicted[np.array(mask)[predicted]]) == [i for i, m in enumerate(mask) if m]
    assert len(set(predicted)) == len(predicted)


def test_sft_batches_are_a_function_of_seed_and_step():
    cfg = resolve("tiny")
    batches = SftBatches(pack(CONVERSATIONS * 5, cfg.model.block_size), cfg, torch.device("cpu"))
    first, again, other = batches(3), batches(3), batches(4)
    assert all(torch.equal(a, b) for pair in zip(first, again) for a, b in zip(*pair))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    assert sum(x.size(0) for x, _ in first) == cfg.train.batch_size


def test_each_process_takes_its_own_slice_of_the_sft_global_batch():
    from slm.training.distributed import World

    cfg = resolve("tiny", flags={"train": {"batch_size": 8, "micro_batch_size": 2}})
    data = pack(CONVERSATIONS * 5, cfg.model.block_size)
    whole = SftBatches(data, cfg, torch.device("cpu"))(3)
    halves = [SftBatches(data, cfg, torch.device("cpu"), World(rank, rank, 2))(3) for rank in (0, 1)]
    assert [len(half) for half in halves] == [2, 2]  # 8 rows = 2 processes x 2 micro-batches of 2
    for (x, y), (wx, wy) in zip(halves[0] + halves[1], whole):
        assert torch.equal(x, wx) and torch.equal(y, wy)


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


def eot_model():
    """A tiny GPT whose every next token is end-of-text: its final norm outputs wte[EOT]'s direction."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        direction = torch.nn.functional.normalize(torch.randn(16), dim=0)
        model.transformer.wte.weight[EOT_ID] = 10 * direction
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)
    return model


def test_an_answer_ends_at_end_of_text_which_is_not_part_of_it():
    session = ChatSession(eot_model(), None, SamplingSettings(temperature=0.0, max_new_tokens=5))
    assert "".join(session.say("Hi!")) == ""
    assert session.messages == [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": ""}]


@pytest.fixture(scope="module")
def tiny_model(tiny_run):
    return load_model(checkpoint_dir(tiny_run))[0]


def test_the_chat_loop_answers_and_obeys_its_commands(tiny_model):
    session = ChatSession(tiny_model, "Be kind.", SamplingSettings(temperature=0.0, max_new_tokens=6))
    out = io.StringIO()
    chat_loop(session, ["Hello there", "/temperature 0.5", "/temperature hot", "/temperature -1", "/reset",
                        "Tom had", "/nope", "/exit", "never read"], out)
    assert session.settings.temperature == 0.5
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]  # /reset kept the system message
    assert session.messages[1]["content"] == "Tom had"
    text = out.getvalue()
    assert "(temperature 0.5)" in text and text.count("/temperature needs a number") == 2
    assert "unknown command /nope" in text and "never read" not in text


def test_a_greedy_answer_is_the_same_in_the_chat_loop_and_on_stdin(tiny_model):
    session = ChatSession(tiny_model, None, SamplingSettings(temperature=0.0, max_new_tokens=8))
    out = io.StringIO()
    chat_loop(session, ["Tom had"], out)
    scripted = io.StringIO()
    answer_lines(session, ["Tom had\n"], scripted)
    assert scripted.getvalue() == " ".join(out.getvalue().strip().split("\n")) + "\n"


def test_slm_chat_reads_stdin_and_prints_one_answer_line_per_input_line(tiny_run, monkeypatch, capsys):
    lines = ["Tom had a", "", json.dumps(CONVERSATIONS[0] + [{"role": "user", "content": "And Lily?"}]), "Mia"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", str(tiny_run), "--temperature", "0", "--max-new-tokens", "12", "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3  # the blank line is no conversation


def test_a_bad_json_line_on_stdin_is_a_one_line_error(tiny_run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO('[{"role": "robot", "content": "hi"}]\n'))
    assert main(["chat", str(tiny_run), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("slm: error: stdin line 1: message 1 has role 'robot'")


def test_slm_chat_samples_as_the_runs_sampling_json_says_unless_a_flag_says_otherwise(tiny_run, tmp_path,
                                                                                    monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "sampling.json").write_text('{"temperature": 0}')

    def answers(*flags):
        monkeypatch.setattr("sys.stdin", io.StringIO("Tom had a\n"))
        assert main(["chat", str(run), "--max-new-tokens", "12", "--device", "cpu", *flags]) == 0
        return capsys.readouterr().out

    greedy = {answers("--seed", str(seed)) for seed in range(3)}
    assert greedy == {answers("--temperature", "0")}  # the run's temperature 0: the same answer whatever the seed
    assert len({answers("--seed", str(seed), "--temperature", "2") for seed in range(4)}) > 1
