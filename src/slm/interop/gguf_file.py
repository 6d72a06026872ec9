"""`slm export --format gguf`: a GGUF file for llama.cpp's `gpt2` architecture (`llama-cli -m FILE.gguf`)."""

from __future__ import annotations

import json
from pathlib import Path

from slm.data.tokenizer import get_tokenizer, vocab_files
from slm.errors import SlmError
from slm.interop.huggingface import LAYER_NORM_EPS, check_exportable, export_state, table
from slm.runs.checkpoint import TIED_HEAD, checkpoint_dir, load_model
from slm.runs.files import write_output

# A compact head's expanded rows carry log q(id), about -11, through a dot product whose other terms have the
# embedding's scale: rounded like the other weights they moved logits 5 to 6 times more than a full head's do
# (test_gguf_file.py's models: f16 2.6e-3 against 4.2e-4, q8_0 4.6e-2 against 9.6e-3); one type up, less.
COMPACT_HEAD_OUTTYPE = {"f32": "f32", "f16": "f32", "q8_0": "f16"}


def export_gguf(run: str | Path, out: str | Path, which: str = "best", outtype: str = "f16",
                force: bool = False) -> Path:
    """A GGUF file for llama.cpp's `gpt2` architecture; 2-D weights in `outtype` (a compact head's expanded
    rows one type more precise: COMPACT_HEAD_OUTTYPE), norms and biases in f32."""
    import gguf  # here, not at the top: `slm export` to a Hugging Face folder never loads it
    run, out = Path(run), Path(out)
    model, cfg, _ = load_model(checkpoint_dir(run, which))
    check_exportable(cfg.model)
    m = cfg.model
    quant = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}
    if outtype not in quant:
        raise SlmError(f"--outtype must be one of {', '.join(quant)} (got {outtype!r})")
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if outtype == "q8_0" and m.n_embd % block:
        raise SlmError(f"q8_0 needs n_embd divisible by {block} (got {m.n_embd}); use --outtype f16")
    tokenizer = get_tokenizer()
    vocab_bpe, encoder_json = vocab_files()
    encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
    tokens = sorted(encoder, key=encoder.get)  # GPT-2's byte-level strings, in id order
    merges = [line for line in Path(vocab_bpe).read_text(encoding="utf-8").splitlines()[1:] if line]  # skip #version
    state = export_state(model)
    tensors = [(gguf_name, state[name]) for name, gguf_name, _ in table(m.n_layer)]
    tensors.append(("output.weight", state[TIED_HEAD]))  # written even when tied, as llama.cpp does

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), "gpt2")
        w.add_name(out.stem)
        w.add_context_length(m.block_size)
        w.add_embedding_length(m.n_embd)
        w.add_feed_forward_length(4 * m.n_embd)
        w.add_block_count(m.n_layer)
        w.add_head_count(m.n_head)
        w.add_layer_norm_eps(LAYER_NORM_EPS)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types([gguf.TokenType.CONTROL if i == tokenizer.eot_id else gguf.TokenType.NORMAL
                           for i in range(len(tokens))])
        w.add_token_merges(merges)
        w.add_bos_token_id(tokenizer.eot_id)
        w.add_eos_token_id(tokenizer.eot_id)
        for name, tensor in tensors:
            data = tensor.float().numpy()
            stored = COMPACT_HEAD_OUTTYPE[outtype] if name == "output.weight" and m.vocab_head else outtype
            kind = quant[stored] if data.ndim == 2 else gguf.GGMLQuantizationType.F32  # llama.cpp keeps 1-D in f32
            if kind == gguf.GGMLQuantizationType.F16:
                data = data.astype("float16")
            elif kind == gguf.GGMLQuantizationType.Q8_0:
                data = gguf.quants.quantize(data, kind)
            w.add_tensor(name, data, raw_dtype=kind)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    write_output(out, force, write)
    return out
