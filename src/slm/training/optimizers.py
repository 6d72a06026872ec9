"""The optimizers a run steps: AdamW alone, or Muon for the blocks' weight matrices and AdamW for the rest.

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) orthogonalises each hidden weight
matrix's momentum before applying it. It is meant for those matrices only (the post and torch.optim.Muon's
documentation say so), so embeddings, the head, layer norms and biases stay on AdamW. A run holds a list of
torch optimizers rather than one object wrapping them, as torch's own tools take them: GradScaler one at a
time, torch.distributed.checkpoint's state-dict functions as a list (one state, keyed by parameter name).
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Replicate

from slm.config import TrainConfig
from slm.device import auto_uses_bf16_on_cpu
from slm.model.gpt import GPT


class Muon(torch.optim.Muon):
    """torch's Muon (its parameter groups, defaults and state), stepped here for two reasons.

    - Precision: torch runs the Newton-Schulz iteration in bfloat16, which a CPU without AVX-512 BF16 or AMX
      emulates: the `cpu` preset's optimizer step took 3,745 ms there against AdamW's 84 ms (bf16
      instructions turned off with ONEDNN_MAX_CPU_ISA=AVX2). `ns_dtype` is float32 on such a CPU (as
      `--dtype auto` decides) and bfloat16 elsewhere, as torch has it.
    - FSDP2 shards a parameter and its gradient on dim 0 as DTensors, and torch's Muon would run the
      iteration as DTensor ops: 11 to 16 collectives per matrix per step (torch 2.13's CommDebugMode, 2
      processes). Replicating the gradient first makes every op after it local: each process orthogonalises
      the whole matrix exactly as one process does and applies its own rows of the update. The momentum
      buffer, made like the gradient, is then a whole matrix on every process, not sharded.

    The update is torch's: Nesterov momentum, Newton-Schulz, decoupled weight decay, and match_rms_adamw's
    scale (build_optimizers says why), except that a parameter holding several matrices stacked (c_attn's
    query, key and value) has each orthogonalised and scaled on its own."""

    def __init__(self, params, ns_dtype: torch.dtype, stacked: dict[torch.Tensor, int] | None = None,
                 **kwargs) -> None:
        """`stacked`: parameters that hold several matrices stacked on dim 0, and how many."""
        super().__init__(params, adjust_lr_fn="match_rms_adamw", **kwargs)
        self.ns_dtype = ns_dtype
        self.stacked = {id(p): parts for p, parts in (stacked or {}).items()}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if isinstance(p.grad, DTensor):
                    p.grad = p.grad.redistribute(placements=[Replicate()] * p.grad.device_mesh.ndim)
                grad, state = p.grad, self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(grad, 1 - group["momentum"])
                update = grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
                # match_rms_adamw's scale per matrix: an orthogonal (m, n) matrix has an RMS of 1/sqrt(max(m, n))
                update = torch.cat([orthogonalise(part, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                                  self.ns_dtype) * math.sqrt(max(part.shape))
                                    for part in update.chunk(self.stacked.get(id(p), 1))])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * 0.2)


def orthogonalise(matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Keller Jordan's quintic Newton-Schulz iteration, as torch.optim.Muon runs it, in `dtype`: roughly
    U S' V^T of the matrix's SVD U S V^T, with S' near 1."""
    a, b, c = coefficients
    x = matrix.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(matrix.dtype)


def is_hidden_matrix(name: str, param: torch.nn.Parameter) -> bool:
    """The weight matrices of the blocks: attention's c_attn and c_proj, the MLP's c_fc and c_proj."""
    return name.startswith("transformer.h.") and param.dim() == 2


def build_optimizers(model: GPT, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW with weight decay on matrices and embeddings only, not on biases or norms; with --optimizer muon,
    Muon takes the blocks' matrices out of AdamW's hands."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    to_muon = {name for name, p in named if cfg.optimizer == "muon" and is_hidden_matrix(name, p)}
    hidden = [p for name, p in named if name in to_muon]
    rest = [p for name, p in named if name not in to_muon]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    # fused on a CPU too: over the cpu preset's 12.9M-value embedding a step took 19 ms in torch's per-tensor
    # loop and 6 ms fused (benchmarks/cpu_preset.md)
    fused = device.type in ("cpu", "cuda")
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)]
    if hidden:
        # match_rms_adamw (Liu et al. 2025, "Muon is Scalable for LLM Training", §2.2) scales each matrix's
        # orthogonalised update to an RMS of 0.2 x lr, a typical AdamW update's, whatever the matrix's shape:
        # muon_learning_rate is on AdamW's scale, and weight decay, which torch's Muon applies as lr x decay
        # per step as AdamW does, means the same for both. (Keller Jordan's scaling, torch's default, wants
        # lr ~0.02 instead, which would decay the matrices 20 times as fast as AdamW does at lr 1e-3.)
        ns_dtype = torch.float32 if device.type == "cpu" and not auto_uses_bf16_on_cpu() else torch.bfloat16
        # c_attn stacks the query, key and value matrices: each is orthogonalised on its own, as if they were
        # three parameters (modded-nanogpt's separate q, k, v); 0.0045 bits per byte lower on the cpu preset
        stacked = {p: 3 for name, p in named if name in to_muon and name.endswith("attn.c_attn.weight")}
        optimizers.append(Muon(hidden, ns_dtype, stacked, lr=cfg.muon_learning_rate,
                               weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum))
    return optimizers


def set_learning_rate(optimizers: list[torch.optim.Optimizer], lr: float, cfg: TrainConfig) -> None:
    """`lr` is AdamW's scheduled rate; Muon's follows the same warm-up and decay from its own peak."""
    for optimizer in optimizers:
        scaled = lr * cfg.muon_learning_rate / cfg.learning_rate if isinstance(optimizer, torch.optim.Muon) else lr
        for group in optimizer.param_groups:
            group["lr"] = scaled
