"""slm export / slm import against transformers' GPT-2, its tokenizer and pipeline, and gguf's reader."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from slm.cli import main
from slm.config import Config, ModelConfig
from slm.data.template import render, render_text
from slm.data.tokenizer import EOT_ID, get_tokenizer
from slm.inference.generate import generate
from slm.interop.huggingface import export_hf, import_hf, table
from slm.model.gpt import GPT
from slm.runs import checkpoint

transformers = pytest.importorskip("transformers")

TEXTS = ["Once upon a time, there was a little girl named Lily.", "  two spaces\n\n\ttabs and 123,456.78 numbers",
         "Unicode: café, naïve, 日本語, emoji 🙂!", "don't won't I'm you're", ""]
CONVERSATION = [{"role": "system", "content": "You tell short stories."},
                {"role": "user", "content": "  Write about a cat. "},
                {"role": "assistant", "content": "The cat sat. The end."},
                {"role": "user", "content": "Another one, please."}]


def make_run(path: Path, seed: int = 0, edit=None, **model) -> Path:
    """A run folder holding a randomly initialised model, changed in place by `edit(model)` if given, as
    `slm train` would lay it out."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=32)
    cfg = Config(model=ModelConfig(**{**settings, **model}))
    checkpoint.prepare_run_dir(path, force=False)
    (path / "config.toml").write_text(cfg.to_toml())
    gpt = GPT(cfg.model)
    if edit:
        with torch.no_grad():
            edit(gpt)
    checkpoint.save(path, "best", gpt, cfg, get_tokenizer().identity())
    return path


def trained_looking(model: GPT) -> None:
    """A final layer norm and a compact head as training leaves them, not as initialised (gain 1, bias 0, no
    frequencies): gains of either sign, some small, which the head's expansion must survive."""
    ln_f = model.transformer.ln_f
    ln_f.weight.uniform_(0.02, 2.0).mul_(torch.sign(torch.randn(ln_f.weight.shape)))
    ln_f.bias.normal_(0, 0.5)
    if model.config.vocab_head:
        model.lm_head.set_frequencies(torch.randint(0, 1000, (model.config.vocab_size,)).float())
        model.lm_head.other.normal_(0, 0.02)  # the embedding's scale: full and compact heads' logits alike


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out[0]


def hf_greedy(hf, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        return hf.generate(ids, do_sample=False, max_new_tokens=n, pad_token_id=EOT_ID)


def test_table_names_are_llama_cpp_gpt2_tensor_names():
    import gguf
    names = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GPT2]}
    ours = {g.rsplit(".", 1)[0].replace("blk.0.", "blk.{bid}.") for _, g, _ in table(1)} | {"output"}
    assert ours == names
    assert {name for name, _, conv1d in table(1) if conv1d} == {
        "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"}


def test_exported_random_model_matches_transformers_logits_and_greedy_text(tmp_path):
    run = make_run(tmp_path / "run")
    out = export_hf(run, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["n_positions"] == config["n_ctx"] == 64 and config["activation_function"] == "gelu_new"
    assert config["tie_word_embeddings"] and config["bos_token_id"] == config["eos_token_id"] == 50256
    ours, _, _ = checkpoint.load_model(run / "best")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.lm_head.weight is hf.transformer.wte.weight
    ids = torch.randint(0, 50257, (3, 64), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits_of(hf, ids), logits_of(ours, ids), atol=1e-4, rtol=0)
    prompt = torch.tensor([get_tokenizer().encode("Once upon a time")])  # 4 tokens + 50 new <= 64 positions
    theirs = hf_greedy(hf, prompt, 50)
    assert theirs.shape[1] == prompt.shape[1] + 50  # no end-of-text came first: the whole 50 are compared
    assert torch.equal(theirs, generate(ours, prompt, 50, temperature=0))


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory, tiny_data) -> dict[int, Path]:
    """Runs trained 40 steps with a 64-token context: a full head (0) and a compact head of 64 ids (64)."""
    from slm.config import resolve
    from slm.training.loop import start

    runs = {}
    for vocab_head in (0, 64):
        run = tmp_path_factory.mktemp("trained") / f"head{vocab_head}"
        train = {"data": str(tiny_data), "max_steps": 40, "eval_interval": 20, "eval_batches": 2,
                 "sample_tokens": 0, "device": "cpu", "warmup_steps": 5}
        start(resolve("tiny", flags={"model": {"block_size": 64, "vocab_head": vocab_head}, "train": train}), run)
        runs[vocab_head] = run
    return runs


@pytest.mark.parametrize("vocab_head", [0, 64], ids=["full-head", "compact-head"])
def test_exported_trained_run_matches_transformers_and_slm_generate_text(tmp_path, trained_runs, vocab_head,
                                                                         capsys):
    run = trained_runs[vocab_head]
    out = export_hf(run, tmp_path / "hf")
    ours, _, _ = checkpoint.load_model(checkpoint.checkpoint_dir(run))
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == (vocab_head == 0)  # the expanded head is untied
    ids = torch.tensor([get_tokenizer().encode("Tom had a ball. Tom liked the ball. The end. Sam zebra quantum")])
    torch.testing.assert_close(logits_of(hf, ids), logits_of(ours, ids), atol=1e-4, rtol=0)
    # 50 greedy tokens, end-of-text or not (transformers told not to stop at it)...
    prompt = torch.tensor([get_tokenizer().encode("Lily had")])
    hf.generation_config.eos_token_id = None
    theirs = hf_greedy(hf, prompt, 50)
    assert theirs.shape[1] == prompt.shape[1] + 50
    assert torch.equal(theirs, generate(ours, prompt, 50, temperature=0))
    # ... and `slm generate --temperature 0`, which stops at end-of-text as transformers does by default.
    assert main(["generate", str(run), "--prompt", "Lily had", "--temperature", "0", "--max-new-tokens", "50",
                 "--device", "cpu"]) == 0
    slm_text = capsys.readouterr().out
    hf.generation_config.eos_token_id = EOT_ID
    theirs = hf_greedy(hf, prompt, 50)[0].tolist()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(theirs, skip_special_tokens=True) == slm_text


def test_expanded_compact_head_is_exact_for_any_layer_norm(tmp_path):
    """The expansion must hold for trained gains and biases, not only for the initial g=1, b=0."""
    from slm.interop.huggingface import expanded_head

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=32, vocab_head=100)).eval()
    with torch.no_grad():
        trained_looking(model)
        model.transformer.ln_f.weight[0] = 0  # a channel the model switched off
        model.lm_head.other.normal_(0, 0.5)
    head, weight, bias = expanded_head(model)
    x = torch.randn(4, 16, 32) * 3
    want = model.lm_head(model.transformer.ln_f(x))
    got = torch.nn.functional.layer_norm(x, (32,), weight, bias) @ head.t()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_model_card_records_data_config_tokens_and_validation(tmp_path, tiny_run):
    card = (export_hf(tiny_run, tmp_path / "hf") / "README.md").read_text()
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    best = min((r for r in records if "val_loss" in r), key=lambda r: r["val_loss"])
    assert f"{best['val_loss']:.4f}" in card and f"{max(r.get('tokens_seen', 0) for r in records):,}" in card
    assert "| model | n_layer | 2 |" in card and "| train | max_steps | 30 |" in card and "Training data:" in card


def test_export_then_import_gives_identical_weights_and_a_tied_head(tmp_path):
    run = make_run(tmp_path / "run", seed=3)
    export_hf(run, tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    before, _, _ = checkpoint.load_model(run / "best")
    for which in ("best", "last"):
        after, cfg, _ = checkpoint.load_model(tmp_path / "back" / which)
        assert cfg.model == before.config
        assert after.lm_head.weight is after.transformer.wte.weight
        assert before.state_dict().keys() == after.state_dict().keys()
        assert all(torch.equal(before.state_dict()[k], after.state_dict()[k]) for k in before.state_dict())
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits_of(before, ids), logits_of(after, ids))
    assert (tmp_path / "back" / "config.toml").is_file()


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_imported_transformers_model_gives_transformers_logits_in_slm(tmp_path, safe_serialization, capsys):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=48, n_embd=32, n_layer=2, n_head=4)
    hf = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path / "hf"
    if safe_serialization:
        hf.save_pretrained(folder)
    else:  # an older-style folder: pytorch_model.bin, read with torch.load(weights_only=True)
        config.save_pretrained(folder)
        torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    run = import_hf(folder, tmp_path / "run")
    ours, cfg, _ = checkpoint.load_model(run / "best")
    assert (cfg.model.block_size, cfg.model.n_head, cfg.model.n_embd) == (48, 4, 32)
    ids = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits_of(ours, ids), logits_of(hf, ids), atol=1e-4, rtol=0)
    # The imported run is an ordinary run: `slm generate` reads it and agrees with transformers.
    assert main(["generate", str(run), "--prompt", "Hello", "--temperature", "0", "--max-new-tokens", "12",
                 "--device", "cpu"]) == 0
    theirs = hf_greedy(hf, torch.tensor([get_tokenizer().encode("Hello")]), 12)[0].tolist()
    assert capsys.readouterr().out == get_tokenizer().decode([i for i in theirs if i != EOT_ID])


def test_exported_tokenizer_matches_slm_tokenizer(tmp_path):
    out = export_hf(make_run(tmp_path / "run"), tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ours = get_tokenizer()
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == ours.encode(text), text
    # A literal "<|endoftext|>" is the special id to Hugging Face, ordinary text to slm (see slm/data/template.py).
    assert tokenizer("<|endoftext|> is text")["input_ids"] == [EOT_ID] + ours.encode(" is text")
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == EOT_ID
    assert tokenizer.chat_template is None  # a base model has no chat template


def test_finetuned_runs_export_carries_slm_chat_template(tmp_path, tiny_run):
    from slm.assistant.finetune import finetune

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Tell me about {x}."},
                                                     {"role": "assistant", "content": f"{x} had a ball."}]}) + "\n"
                            for x in ("Tom", "Lily", "Sam", "Mia") * 5))
    run = tmp_path / "assistant"
    finetune(tiny_run, data, run, flags={"max_steps": 2, "eval_interval": 2, "eval_batches": 1, "device": "cpu",
                                         "warmup_steps": 1}, val_fraction=0.2)
    out = export_hf(run, tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for generation_prompt in (False, True):
        text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=generation_prompt)
        assert text == render_text(CONVERSATION, add_generation_prompt=generation_prompt)
        ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=generation_prompt,
                                            return_dict=False)
        assert list(ids) == render(CONVERSATION, add_generation_prompt=generation_prompt)[0]
    assert "fine-tuned from" in (out / "README.md").read_text()


def test_text_generation_pipeline_runs_offline(tmp_path):
    out = export_hf(make_run(tmp_path / "run"), tmp_path / "hf")
    generator = transformers.pipeline("text-generation", model=str(out), device="cpu")
    text = generator("Once upon a time", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("Once upon a time") and len(text) > len("Once upon a time")


def error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("slm: error: ") and err.count("\n") == 1, err
    return err


def test_export_refuses_bias_free_models_and_unknown_formats(tmp_path, capsys):
    assert "bias=False" in error_line(capsys, ["export", str(make_run(tmp_path / "a", bias=False)),
                                               "--out", str(tmp_path / "x")])
    assert "--format" in error_line(capsys, ["export", str(make_run(tmp_path / "b")), "--format", "onnx",
                                             "--out", str(tmp_path / "y")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_existing_out_needs_force_and_is_replaced_whole(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert "--force" in error_line(capsys, ["export", str(run), "--out", str(out)])
    assert main(["export", str(run), "--out", str(out), "--force"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "stale.txt").exists()
    assert not list(tmp_path.glob(".hf.tmp-*"))


def test_import_refuses_other_architectures_activations_shapes_and_missing_files(tmp_path, capsys):
    config = transformers.GPT2Config(vocab_size=50257, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    good = tmp_path / "good"
    transformers.GPT2LMHeadModel(config).save_pretrained(good)
    capsys.readouterr()  # drop transformers' progress bar, so each error below is read alone

    def variant(name: str, **changes) -> str:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, **changes}))
        return str(folder)

    out = ["--out", str(tmp_path / "run")]
    assert "'llama'" in error_line(capsys, ["import", variant("llama", model_type="llama",
                                                               architectures=["LlamaForCausalLM"])] + out)
    assert "'relu'" in error_line(capsys, ["import", variant("relu", activation_function="relu")] + out)
    assert "shape" in error_line(capsys, ["import", variant("wide", n_embd=64)] + out)
    truncated = Path(variant("truncated")) / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-64])
    assert "truncated or corrupt" in error_line(capsys, ["import", str(truncated.parent)] + out)
    no_weights = variant("empty")
    (Path(no_weights) / "model.safetensors").unlink()
    assert "model.safetensors" in error_line(capsys, ["import", no_weights] + out)
    assert "not a folder" in error_line(capsys, ["import", str(tmp_path / "missing")] + out)
    (Path(no_weights) / "config.json").unlink()
    assert "no config.json" in error_line(capsys, ["import", no_weights] + out)
    assert "does not exist" in error_line(capsys, ["export", str(tmp_path / "norun"), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "run").exists()


def test_push_to_hub_offline_fails_with_one_line(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    run = make_run(tmp_path / "run")
    assert "HF_HUB_OFFLINE" in error_line(capsys, ["export", str(run), "--out", str(tmp_path / "hf"),
                                                   "--push-to-hub", "someone/model"])
    assert (tmp_path / "hf" / "model.safetensors").is_file()  # the local folder is kept
    assert "--format hf" in error_line(capsys, ["export", str(run), "--format", "gguf", "--out",
                                                str(tmp_path / "m.gguf"), "--push-to-hub", "someone/model"])
