"""The tensors slm exports, by one table that both directions and both formats read.

slm's parameter names are GPT-2's, so the table, `table()`, lists each slm tensor, its name in llama.cpp's GGUF
`gpt2` architecture, and whether Hugging Face stores it transposed. HF's GPT-2 uses Conv1D layers whose weights
are (in, out), the transpose of nn.Linear's (out, in), for exactly the four matrices c_attn, c_proj (attention),
c_fc and c_proj (MLP). GGUF stores nn.Linear's layout, as llama.cpp's convert_hf_to_gguf.py does after
transposing those same four back. The tied head is stored once in the HF folder (tie_word_embeddings) and
written again as GGUF's `output` tensor, one of the tensors gguf's MODEL_TENSORS lists for MODEL_ARCH.GPT2
(older llama.cpp builds require it; newer ones accept it).

A compact vocabulary head (model.gpt.CompactHead) is exported expanded to an untied (V, C) head whose logits are
exactly the compact head's full logits; `expanded_head` explains how without a bias.
"""

from __future__ import annotations

import torch

from slm.config import ModelConfig
from slm.errors import SlmError
from slm.model.gpt import GPT, CompactHead
from slm.runs.checkpoint import TIED_HEAD

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
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which model.py uses


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
    (tensors[TIED_HEAD], tensors["transformer.ln_f.weight"],
     tensors["transformer.ln_f.bias"]) = expanded_head(model)
    return tensors
