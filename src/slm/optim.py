"""The optimizers a run steps: AdamW alone, or Muon for the blocks' weight matrices and AdamW for the rest.

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) orthogonalises each hidden weight
matrix's momentum before applying it. It is meant for those matrices only (the post and torch.optim.Muon's
documentation say so), so embeddings, the head, layer norms and biases stay on AdamW. A run holds a list of
torch optimizers rather than one object wrapping them, as torch's own tools take them: GradScaler one at a
time, torch.distributed.checkpoint's state-dict functions as a list (one state, keyed by parameter name).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate

from slm.config import TrainConfig
from slm.model import GPT


class Muon(torch.optim.Muon):
    """torch's Muon, orthogonalising each whole matrix under FSDP with one all-gather.

    FSDP2 shards a parameter and its gradient on dim 0 as DTensors. torch's Muon computes the right update on
    them, but runs the Newton-Schulz iteration as DTensor ops: 11 to 16 collectives per matrix per step
    (torch 2.13's CommDebugMode, 2 processes), most of them all-gathers of the whole matrix.
    Replicating the gradient first makes every op after it local: each process orthogonalises the whole
    matrix exactly as one process does (the same bits) and applies its own rows of the update. The momentum
    buffer, made like the gradient, is then a whole matrix on every process, not sharded."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if isinstance(p.grad, DTensor):
                    p.grad = p.grad.redistribute(placements=[Replicate()] * p.grad.device_mesh.ndim)
        return super().step(closure)


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
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")]
    if hidden:
        # match_rms_adamw (Liu et al. 2025, "Muon is Scalable for LLM Training", §2.2) scales each matrix's
        # orthogonalised update to an RMS of 0.2 x lr, a typical AdamW update's, whatever the matrix's shape:
        # muon_learning_rate is on AdamW's scale, and weight decay, which torch's Muon applies as lr x decay
        # per step as AdamW does, means the same for both. (Keller Jordan's scaling, torch's default, wants
        # lr ~0.02 instead, which would decay the matrices 20 times as fast as AdamW does at lr 1e-3.)
        optimizers.append(Muon(hidden, lr=cfg.muon_learning_rate, weight_decay=cfg.weight_decay,
                               momentum=cfg.muon_momentum, adjust_lr_fn="match_rms_adamw"))
    return optimizers


def set_learning_rate(optimizers: list[torch.optim.Optimizer], lr: float, cfg: TrainConfig) -> None:
    """`lr` is AdamW's scheduled rate; Muon's follows the same warm-up and decay from its own peak."""
    for optimizer in optimizers:
        scaled = lr * cfg.muon_learning_rate / cfg.learning_rate if isinstance(optimizer, torch.optim.Muon) else lr
        for group in optimizer.param_groups:
            group["lr"] = scaled
