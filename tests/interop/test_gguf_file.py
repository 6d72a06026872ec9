import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import skip_unless_ci
from slm.cli import main
from slm.config import ModelConfig
from slm.data.tokenizer import EOT_ID, get_tokenizer
from slm.inference.generate import generate
from slm.interop.huggingface import table
from slm.model.gpt import GPT
from slm.runs import checkpoint
from test_huggingface import logits_of, make_run, trained_looking, trained_runs  # noqa: F401 (a fixture)


@pytest.mark.parametrize("outtype, atol", [("f32", 0.0), ("f16", 1e-3), ("q8_0", 2e-3)])
def test_gguf_export_reads_back_with_llama_cpp_names_metadata_and_weights(tmp_path, outtype, atol):
    import gguf
    run = make_run(tmp_path / "run", block_size=32)
    out = tmp_path / "model.gguf"
    assert main(["export", str(run), "--format", "gguf", "--outtype", outtype, "--out", str(out)]) == 0
    reader = gguf.GGUFReader(out)

    def value(key):
        return reader.fields[key].contents()

    assert value("general.architecture") == "gpt2"
    assert (value("gpt2.context_length"), value("gpt2.embedding_length"), value("gpt2.feed_forward_length"),
            value("gpt2.block_count"), value("gpt2.attention.head_count")) == (32, 32, 128, 2, 2)
    assert value("gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.bos_token_id") == value("tokenizer.ggml.eos_token_id") == 50256
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == 50257 and tokens[50256] == "<|endoftext|>" and tokens[15496] == "Hello"
    assert len(value("tokenizer.ggml.merges")) == 50000 and len(value("tokenizer.ggml.token_type")) == 50257
    model, _, _ = checkpoint.load_model(run / "best")
    state = model.state_dict()
    expected = {g: state[name] for name, g, _ in table(2)} | {"output.weight": state["transformer.wte.weight"]}
    assert {t.name for t in reader.tensors} == set(expected)
    for t in reader.tensors:
        data = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        want = expected[t.name]
        assert data.shape == want.shape, t.name  # GGUF keeps nn.Linear's (out, in) layout
        assert list(t.shape) == list(reversed(want.shape))  # ggml lists dimensions innermost first
        torch.testing.assert_close(data, want, atol=atol, rtol=0 if outtype == "f32" else 1e-3)


def gguf_logits(path: Path, cfg: ModelConfig, ids: torch.Tensor) -> torch.Tensor:
    """The logits of a GGUF export as llama.cpp's CPU backend computes them: every weight dequantized, and every
    matmul's input rounded to the type ggml pairs with its weight's (vec_dot_type: f16 for f16, q8_0 for q8_0)."""
    import gguf
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    gguf_name = {name: g for name, g, _ in table(cfg.n_layer)} | {checkpoint.TIED_HEAD: "output.weight"}

    def dequantized(name: str) -> torch.Tensor:
        t = stored[gguf_name[name]]
        return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())

    def round_input(kind):
        return lambda module, args: torch.from_numpy(gguf.quants.dequantize(
            gguf.quants.quantize(args[0].numpy(), kind), kind).copy())

    model = GPT(dataclasses.replace(cfg, vocab_head=0)).eval()
    model.load_state_dict({name: dequantized(name) for name in gguf_name if name != checkpoint.TIED_HEAD},
                          strict=False)
    model.lm_head.weight = torch.nn.Parameter(dequantized(checkpoint.TIED_HEAD))  # untied: GGUF's output tensor
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(round_input(stored[gguf_name[f"{name}.weight"]].tensor_type))
    return logits_of(model, ids)


@pytest.mark.parametrize("outtype, atol", [("f16", 1e-3), ("q8_0", 2e-2)])
@pytest.mark.parametrize("vocab_head", [0, 100], ids=["full-head", "compact-head"])
def test_quantized_gguf_of_a_compact_head_is_as_accurate_as_of_a_full_head(tmp_path, outtype, atol, vocab_head):
    """The expanded head carries log q(id) (about -11) on top of logits of the embedding's scale. Rows scaled by
    1/gain and stored like the other weights moved logits by 9.2e-3 (f16) and 0.46 (q8_0); a full head's: 4.2e-4
    and 9.6e-3. The computation is llama.cpp's on the CPU, emulated: llama-cpp-python may not be installed."""
    run = make_run(tmp_path / "run", edit=trained_looking, block_size=32, vocab_head=vocab_head)
    out = tmp_path / "model.gguf"
    assert main(["export", str(run), "--format", "gguf", "--outtype", outtype, "--out", str(out)]) == 0
    ours, cfg, _ = checkpoint.load_model(run / "best")
    ids = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(1))
    error = (gguf_logits(out, cfg.model, ids) - logits_of(ours, ids)).abs().max().item()
    assert error <= atol, f"{outtype} logits moved by {error:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("vocab_head", [0, 64], ids=["full-head", "compact-head"])
def test_llama_cpp_runs_the_gguf_export_with_slms_logits_and_greedy_text(tmp_path, trained_runs, vocab_head):
    """llama.cpp itself as the judge. llama-cpp-python compiles llama.cpp from source (minutes), so it is not
    in the test extra: `pip install llama-cpp-python` to run this."""
    if importlib.util.find_spec("llama_cpp") is None:
        skip_unless_ci("llama.cpp judges the GGUF export: pip install llama-cpp-python==0.3.36 (compiles minutes)")
    import llama_cpp

    run = trained_runs[vocab_head]
    out = tmp_path / "model.gguf"
    assert main(["export", str(run), "--format", "gguf", "--outtype", "f32", "--out", str(out)]) == 0
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False, seed=0)
    ids = get_tokenizer().encode("Tom had a ball. Tom liked the ball. The end. Sam zebra quantum")
    assert llm.tokenize(b"Tom had a ball. Tom liked the ball. The end. Sam zebra quantum", add_bos=False) == ids
    llm.eval(ids)
    ours, _, _ = checkpoint.load_model(checkpoint.checkpoint_dir(run))
    theirs = torch.from_numpy(llm.scores[:len(ids)].copy())
    torch.testing.assert_close(theirs, logits_of(ours, torch.tensor([ids]))[0], atol=1e-3, rtol=0)
    llm.reset()
    text = llm.create_completion("Lily had", max_tokens=50, temperature=0.0)["choices"][0]["text"]
    prompt = torch.tensor([get_tokenizer().encode("Lily had")])
    new = generate(ours, prompt, 50, temperature=0)[0, prompt.shape[1]:].tolist()
    expected = get_tokenizer().decode(new[:new.index(EOT_ID)] if EOT_ID in new else new)
    llm.close()
    assert text == expected
