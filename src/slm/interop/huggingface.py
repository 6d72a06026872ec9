"""`slm export` and `slm import`: Hugging Face GPT-2 folders both ways (`--format gguf`: gguf_file.py).

slm's parameter names are GPT-2's, so both directions and both formats read one table, `table()`: each slm
tensor, its name in llama.cpp's GGUF `gpt2` architecture, and whether Hugging Face stores it transposed. HF's
GPT-2 uses Conv1D layers whose weights are (in, out), the transpose of nn.Linear's (out, in), for exactly the four
matrices c_attn, c_proj (attention), c_fc and c_proj (MLP). GGUF stores nn.Linear's layout, as llama.cpp's
convert_hf_to_gguf.py does after transposing those same four back. The tied head is stored once in the HF
folder (tie_word_embeddings) and written again as GGUF's `output` tensor, one of the tensors gguf's
MODEL_TENSORS lists for MODEL_ARCH.GPT2 (older llama.cpp builds require it; newer ones accept it).

A compact vocabulary head (model.gpt.CompactHead) is exported expanded to an untied (V, C) head whose logits are
exactly the compact head's full logits; `expanded_head` explains how without a bias.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slm.config import Config, ModelConfig, add_checkpoint_choice
from slm.data.tokenizer import EOT_ID, EOT_TOKEN, get_tokenizer, vocab_files
from slm.errors import SlmError
from slm.model.gpt import GPT, CompactHead
from slm.runs import checkpoint
from slm.runs.card import hub_card
from slm.runs.files import write_output, write_text_atomic
from slm.runs.plot import CURVES

GLOBAL = [("transformer.wte.weight", "token_embd.weight", False),
          ("transformer.wpe.weight", "position_embd.weight", False),
          ("transformer.ln_f.weight", "output_norm.weight", False),
          ("transformer.ln_f.bias", "output_norm.bias", False)]
PER_LAYER = [("ln_1.weight", "attn_norm.weight", False), ("ln_1.bias", "attn_norm.bias", False),
             ("attn.c_attn.weight", "attn_qkv.weight", True), ("attn.c_attn.bias", "attn_qkv.bias", False),
             ("attn.c_proj.weight", "attn_output.weight", True), ("attn.c_proj.bias", "attn_output.bias", False),
             ("ln_2.weight", "ffn_norm.weight", False), ("ln_2.bias", "ffn_norm.bias", False),
             ("mlp.c_fc.weight", "ffn_up.weight", True), ("mlp.c_fc.bias", "ffn_up.bias", False),
             ("mlp.c_proj.weight", "ffn_down.weight", True), ("mlp.c_proj.bias", "ffn_down.bias", False)]
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which model.gpt uses
HF_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are tanh GELU, which model.gpt computes


def table(n_layer: int) -> list[tuple[str, str, bool]]:
    """(slm and HF name, GGUF name, stored transposed by HF) for every tensor but the tied head."""
    return GLOBAL + [(f"transformer.h.{i}.{ours}", f"blk.{i}.{gguf}", t)
                     for i in range(n_layer) for ours, gguf, t in PER_LAYER]


def check_exportable(cfg: ModelConfig) -> None:
    if not cfg.bias:
        raise SlmError("this model has bias=False, which Hugging Face's GPT-2 cannot express; export needs bias=True")


def expanded_head(model: GPT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A (V, C) head and a final layer norm (gain, bias) that give a compact head's exact full-vocabulary logits.

    Row i of the head is the vector of i's class (its own embedding, or "other"), and a rare id's logit needs
    + log q(i) on top; GPT-2's lm_head has no bias for it. ln_f's output is y = n*g + b with n normalised, so
    logit i is row_i.(n*g) + bias_i, bias_i = row_i.b + log q(i) a constant per id. Two exact rewrites carry it:
    - scaling channel d of every row by g_d/G (G = rms(g)) turns ln_f's gain into the constant G; the rows keep
      the embedding's scale on average, and a small g_d shrinks a channel instead of inflating it;
    - n sums to zero over channels, so ln_f's output with the constant bias beta sums to C*beta for every input:
      t_i added to each channel of row i adds t_i*C*beta to logit i, and t_i pays bias_i less what row i's
      scaled channels already get from beta.
    beta makes the rows (by t) and the activations (by beta) grow by the same factor over their scales, no more
    than each needs; llama.cpp rounds both to f16 or q8_0 blocks. Computed in float64, exact to f32 rounding."""
    head, ln_f = model.lm_head, model.transformer.ln_f
    if not isinstance(head, CompactHead):
        return model.transformer.wte.weight.detach(), ln_f.weight.detach(), ln_f.bias.detach()
    g, b = ln_f.weight.detach().double(), ln_f.bias.detach().double()
    wte = model.transformer.wte.weight.detach().double()
    rows = torch.cat([wte[head.head_ids], head.other.detach().double()])[head.class_of]  # (V, C)
    bias = rows @ b + head.log_q.double()                                                 # (V,)
    C, G = g.numel(), g.square().mean().sqrt()
    rows *= g / G
    rho = (wte * (g / G)).square().mean().sqrt()  # the scaled embedding's scale
    beta = G * max(1.0, (bias.abs().max() / (C * rho * G)).sqrt().item())
    t = (bias - beta * rows.sum(1)) / (C * beta)
    return (rows + t[:, None]).float(), torch.full_like(g, G).float(), torch.full_like(g, beta).float()


def export_state(model: GPT) -> dict[str, torch.Tensor]:
    """Every exported tensor by its slm (= HF) name, in nn.Linear's layout, the head as `lm_head.weight`."""
    state = model.state_dict()
    tensors = {name: state[name] for name, _, _ in table(model.config.n_layer)}
    (tensors[checkpoint.TIED_HEAD], tensors["transformer.ln_f.weight"],
     tensors["transformer.ln_f.bias"]) = expanded_head(model)
    return tensors


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for transformers' GPT2LMHeadModel; STYLE §4 lists the mapping."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_inner": None, "activation_function": "gelu_new",
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "layer_norm_epsilon": LAYER_NORM_EPS, "initializer_range": 0.02, "scale_attn_weights": True,
            "bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "tie_word_embeddings": not cfg.vocab_head,
            "torch_dtype": "float32"}


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """HF's layout: Conv1D weights transposed; the head stored only when it is not tied to wte."""
    state = export_state(model)
    hf = {name: (state[name].t() if conv1d else state[name]).contiguous()
          for name, _, conv1d in table(model.config.n_layer)}
    if model.config.vocab_head:
        hf[checkpoint.TIED_HEAD] = state[checkpoint.TIED_HEAD].contiguous()
    return hf


def model_config_from_hf(config: dict[str, Any], where: Path) -> ModelConfig:
    """The ModelConfig of an HF GPT-2 config.json, or SlmError naming what slm cannot represent."""
    architectures = config.get("architectures") or ["GPT2LMHeadModel"]
    if config.get("model_type") != "gpt2" or "GPT2LMHeadModel" not in architectures:
        raise SlmError(f"{where} is a {config.get('model_type')!r} model ({', '.join(architectures)}); "
                       f"slm imports only GPT-2 (model_type 'gpt2', GPT2LMHeadModel)")
    activation = config.get("activation_function", "gelu_new")
    if activation not in HF_ACTIVATIONS:
        raise SlmError(f"{where} uses activation_function {activation!r}; slm's GPT computes tanh GELU "
                       f"({' or '.join(HF_ACTIVATIONS)}) only")
    n_embd = config.get("n_embd", 768)
    unsupported = {"n_inner": (config.get("n_inner"), (None, 4 * n_embd)),
                   "layer_norm_epsilon": (config.get("layer_norm_epsilon", LAYER_NORM_EPS), (LAYER_NORM_EPS,)),
                   "scale_attn_by_inverse_layer_idx": (config.get("scale_attn_by_inverse_layer_idx", False), (False,)),
                   "scale_attn_weights": (config.get("scale_attn_weights", True), (True,)),
                   "tie_word_embeddings": (config.get("tie_word_embeddings", True), (True,))}
    for key, (value, allowed) in unsupported.items():
        if value not in allowed:
            raise SlmError(f"{where} has {key}={value!r}, which slm's GPT cannot represent (it needs {allowed[-1]!r})")
    if config.get("vocab_size") != get_tokenizer().vocab_size:
        raise SlmError(f"{where} has vocab_size {config.get('vocab_size')}; slm uses GPT-2's tokenizer, "
                       f"{get_tokenizer().vocab_size} ids")
    dropout = config.get("resid_pdrop", 0.0)
    return ModelConfig(vocab_size=config["vocab_size"], block_size=config.get("n_positions", 1024), n_embd=n_embd,
                       n_layer=config.get("n_layer", 12), n_head=config.get("n_head", 12), dropout=dropout)


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        try:
            state = load_file(folder / "model.safetensors")
        except (SafetensorError, OSError) as err:
            raise SlmError(f"{folder / 'model.safetensors'} is truncated or corrupt ({err}); download or "
                           f"save it again") from None
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)  # runs no code
    else:
        raise SlmError(f"{folder} has neither model.safetensors nor pytorch_model.bin (sharded checkpoints are "
                       f"not supported); save the model with save_pretrained(safe_serialization=True)")
    # GPT2Model checkpoints (the original `gpt2` on the hub) lack the `transformer.` prefix; old ones also
    # carry the causal-mask buffers attn.bias and attn.masked_bias, which are not weights.
    return {(name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"): t
            for name, t in state.items() if not name.endswith((".attn.bias", ".attn.masked_bias"))}


def model_from_hf(folder: Path) -> GPT:
    """An slm GPT with the weights of a local Hugging Face GPT-2 folder."""
    if not (folder / "config.json").is_file():
        raise SlmError(f"{folder} has no config.json; point slm import at a Hugging Face model folder")
    cfg = model_config_from_hf(json.loads((folder / "config.json").read_text(encoding="utf-8")), folder)
    hf = read_hf_weights(folder)
    model = GPT(cfg)
    state = {}
    for name, _, conv1d in table(cfg.n_layer):
        if name not in hf:
            raise SlmError(f"{folder} has no tensor {name}; it is not a complete GPT-2 checkpoint")
        tensor = hf.pop(name).float()
        tensor = tensor.t() if conv1d else tensor
        expected = model.state_dict()[name].shape
        if tensor.shape != expected:
            raise SlmError(f"{folder}: {name} has shape {tuple(tensor.shape)} but its config.json implies "
                           f"{tuple(expected)}")
        state[name] = tensor.contiguous()
    head = hf.pop(checkpoint.TIED_HEAD, None)
    if head is not None and not torch.equal(head.float(), state["transformer.wte.weight"]):
        raise SlmError(f"{folder} has an lm_head that differs from its token embedding; slm's head is tied")
    if hf:
        raise SlmError(f"{folder} has tensors slm's GPT-2 does not know: {', '.join(sorted(hf)[:5])}")
    model.load_state_dict(state, strict=False)  # lm_head.weight is wte's, tied in GPT.__init__
    return model.eval()


def write_hf_folder(model: GPT, out: Path, chat: bool, card: str) -> None:
    """Every file of the HF folder, into `out` (a fresh temporary folder)."""
    cfg = model.config
    save_file(hf_state_dict(model), out / "model.safetensors", metadata={"format": "pt"})  # transformers needs "pt"
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n", encoding="utf-8")
    generation = {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    vocab_bpe, encoder_json = vocab_files()  # byte-identical to GPT-2's merges.txt and vocab.json
    shutil.copyfile(encoder_json, out / "vocab.json")
    shutil.copyfile(vocab_bpe, out / "merges.txt")
    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}
    tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": cfg.block_size,
                        "add_prefix_space": False, "add_bos_token": False, **special}
    if chat:
        from slm.data.template import CHAT_TEMPLATE_JINJA
        tokenizer_config["chat_template"] = CHAT_TEMPLATE_JINJA
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(card, encoding="utf-8")


def export_hf(run: str | Path, out: str | Path, which: str = "best", force: bool = False) -> Path:
    run, out = Path(run), Path(out)
    model, cfg, _ = checkpoint.load_model(checkpoint.checkpoint_dir(run, which))
    check_exportable(cfg.model)
    card = hub_card(run, cfg, model.num_parameters(), out.name)

    def write(tmp: Path) -> None:
        tmp.mkdir()
        write_hf_folder(model, tmp, chat=(run / "finetune.json").is_file(), card=card)
        if (run / CURVES).is_file():  # the card shows it
            shutil.copyfile(run / CURVES, tmp / CURVES)
    write_output(out, force, write)
    return out


def import_hf(folder: str | Path, out: str | Path, force: bool = False) -> Path:
    """An slm run (config.toml, best/, last/) holding the weights of a local HF GPT-2 folder."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise SlmError(f"{folder} is not a folder; slm import reads a local Hugging Face model folder")
    model = model_from_hf(folder)
    cfg = Config(model=model.config)
    checkpoint.prepare_run_dir(out, force)
    write_text_atomic(out / "config.toml", cfg.to_toml())
    for name in ("best", "last"):
        checkpoint.save(out, name, model, cfg, get_tokenizer().identity())
    return out


def push_to_hub(folder: Path, repo: str) -> None:
    """Upload the exported folder to the Hub repository `repo` (created if needed; needs `hf auth login`)."""
    from huggingface_hub import HfApi, constants
    if constants.HF_HUB_OFFLINE:
        raise SlmError(f"cannot push to {repo}: HF_HUB_OFFLINE is set; {folder} was written, push it later "
                       f"with `hf upload {repo} {folder}`")
    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=folder)
    except Exception as err:  # network, auth and permission failures each have their own type
        raise SlmError(f"pushing {folder} to {repo} failed ({type(err).__name__}: {err}); "
                       f"{folder} was written") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_choice(p)
    p.add_argument("--format", choices=("hf", "gguf"), default="hf", help="hf: a transformers model folder "
                   "(default); gguf: one file for llama.cpp")
    p.add_argument("--out", required=True, help="the folder (hf) or .gguf file to write")
    p.add_argument("--outtype", choices=("f32", "f16", "q8_0"), default="f16", help="gguf: storage type of the "
                   "weight matrices, as llama.cpp's converter names it; norms and biases stay f32 (default: f16)")
    p.add_argument("--push-to-hub", metavar="REPO", help="hf: also upload the folder to this Hub repository "
                   "(needs `hf auth login` and the network)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a folder with config.json and model.safetensors or pytorch_model.bin")
    p.add_argument("--out", required=True, help="run folder to write (config.toml, best/, last/)")
    p.add_argument("--force", action="store_true", help="replace an existing run folder")


def main(args) -> int:
    if args.command == "import":
        out = import_hf(args.dir, args.out, args.force)
        print(f"imported {args.dir} into {out}; try `slm generate {out}`")
        return 0
    if args.format == "gguf":
        from slm.interop.gguf_file import export_gguf  # here: it reads this module's table; HF exports skip it
        if args.push_to_hub:
            raise SlmError("--push-to-hub uploads a Hugging Face folder; use it with --format hf")
        out = export_gguf(args.run, args.out, args.checkpoint, args.outtype, args.force)
    else:
        out = export_hf(args.run, args.out, args.checkpoint, args.force)
        if args.push_to_hub:
            push_to_hub(out, args.push_to_hub)
    print(f"exported {args.run} to {out}")
    return 0
