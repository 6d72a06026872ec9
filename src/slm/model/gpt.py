"""The GPT: token + learned position embeddings, pre-norm transformer blocks, a tied linear head.

Parameter names follow GPT-2's checkpoints (`transformer.wte`, `h.{i}.attn.c_attn`, `lm_head`, ...), so the
Hugging Face export is a table of names, not a translation layer. Shapes: B batch, T time, C n_embd,
H n_head, D head_dim, V vocab_size.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from slm.config import ModelConfig

IGNORE_INDEX = -100  # target id that contributes no loss (PyTorch's and Hugging Face's default)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, not even called where it does nothing (evaluation, p = 0): a one-token decoding step is bound
    by its number of calls, and nn.Dropout modules cost it two per block and one more, each returning its input."""
    return F.dropout(x, p) if training and p else x


# On a CPU in bfloat16, attention over up to this many tokens trains 1.2x (1,024 tokens) to 5x (64) faster as two
# matmuls around a float32 softmax than in SDPA's flash kernel (forward + backward at 4,096 tokens a batch;
# benchmarks/cpu_attention.py). The flash kernel wins in float32, and never holds the T x T scores.
MATMUL_ATTENTION_MAX_T = 1024


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Causal self-attention over T new tokens, (B, H, T, D) each, by whichever kernel is faster here."""
    T = q.size(-2)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and T <= MATMUL_ATTENTION_MAX_T:
        return matmul_attention(q, k, v, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=dropout_p)


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """The textbook causal attention, as two batched matmuls around a float32 softmax."""
    T = q.size(-2)
    # An added -inf above the diagonal rather than masked_fill: the backward pass has nothing to mask then.
    future = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    scores = (q * q.size(-1) ** -0.5) @ k.transpose(-2, -1) + future
    weights = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
    return dropout(weights, dropout_p, dropout_p > 0) @ v


class KVCache(Protocol):
    """What attention needs from a key/value cache; kv_cache.py owns the implementation."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's (B, H, T, D) keys and values; return all cached ones (B, H, L, D)."""
        ...

    def positions(self, T: int) -> torch.Tensor:
        """Position ids (B, T) of the T new tokens, each row at its own length, or (1, T) when every row counts
        alike."""
        ...

    def attention_mask(self, T: int) -> torch.Tensor | None:
        """(B, 1, T, L) bool over the L keys `update` returns, True where a new token may attend; None when
        either nothing is cached (causal attention over the T new tokens) or T is 1 and every row is at one
        length (each new token attends to every key and to itself)."""
        ...


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        # One view, one permute and one unbind rather than a split and three view-transposes: a one-token
        # decoding step is bound by the number of operations, not by their size (kv_cache.py).
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D) each
        dropout_p = self.dropout if self.training else 0.0
        if kv_cache is None:
            y = causal_attention(q, k, v, dropout_p)
        else:
            mask = kv_cache.attention_mask(T)  # (B, 1, T, L): the cache knows what was cached and padded
            k, v = kv_cache.update(self.layer, k, v)
            # Without a mask one new token attends to every key: SDPA's is_causal would align it with the first.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, C)
        return dropout(self.c_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # tanh GELU is GPT-2's `gelu_new`; exact GELU would drift from Hugging Face by ~5e-4 per activation.
        return dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache)
        return x + self.mlp(self.ln_2(x))


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over many classes in bf16/fp16 loses precision: compute it in float32 (or float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class CompactHead(nn.Module):
    """An exact output layer that scores only the K most frequent ids plus one "other" class.

    p(id) = softmax(class logits)[id's class] for the K frequent ids, and P(other) * q(id) for every other id,
    where q is a fixed distribution over the rare ids (their smoothed training frequencies). That is a proper
    distribution over the whole vocabulary, so loss, perplexity and bits per byte stay exact and comparable
    with a full head, while the (B*T, V) matmul that dominates a small model on a CPU shrinks to (B*T, K+1).
    The frequent ids' output vectors are rows of the token embedding (tied, as in GPT-2)."""

    def __init__(self, cfg: ModelConfig, wte: nn.Embedding) -> None:
        super().__init__()
        self.wte = [wte]  # a list, so the tied embedding is not registered (and saved) twice
        self.other = nn.Parameter(torch.zeros(1, cfg.n_embd))
        # Filled from the training data by set_frequencies(), or by loading a checkpoint.
        self.register_buffer("head_ids", torch.arange(cfg.vocab_head))                      # (K,)
        self.register_buffer("class_of", torch.full((cfg.vocab_size,), cfg.vocab_head))   # (V,) id -> 0..K
        self.register_buffer("log_q", torch.zeros(cfg.vocab_size))                         # (V,) 0 for the K
        self._cached_matrix: tuple[tuple, torch.Tensor] | None = None  # (key, matrix): see output_matrix
        self._cached_rare: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # see rare_by_likelihood

    def set_frequencies(self, counts: torch.Tensor) -> None:
        """Choose the K most frequent ids of `counts` (V,) and q over the rest, add-one smoothed so that
        every id, even one never seen in training, keeps a non-zero probability."""
        K = self.head_ids.numel()
        counts = counts.double()
        head_ids = torch.argsort(counts, descending=True, stable=True)[:K]
        class_of = torch.full_like(self.class_of, K)
        class_of[head_ids] = torch.arange(K, device=class_of.device)
        rare = class_of == K
        q = torch.where(rare, counts + 1.0, torch.zeros_like(counts))
        log_q = torch.where(rare, torch.log(q / q.sum()), torch.zeros_like(counts))
        self.head_ids.copy_(head_ids)
        self.class_of.copy_(class_of)
        self.log_q.copy_(log_q.to(self.log_q.dtype))

    def output_matrix(self) -> torch.Tensor:
        """(C, K+1): the K frequent ids' embedding rows, then "other", as columns. Decoding one token at a
        time would spend more on gathering these rows than on the matmul, so without autograd a contiguous
        copy is kept until a weight changes (in-place updates bump a tensor's _version; .to() makes new
        storage) or the model goes back to training (`train`). Contiguous columns also stream: a cold
        (1, C) @ (C, K+1) took 0.38 ms against 0.86 ms for the transposed (K+1, C) rows on this project's CPU."""
        if torch.is_grad_enabled():
            return self._class_rows().t()
        key = _versions(self.wte[0].weight, self.other, self.head_ids)
        if self._cached_matrix is None or self._cached_matrix[0] != key:
            self._cached_matrix = key, self._class_rows().t().contiguous()
        return self._cached_matrix[1]

    def rare_by_likelihood(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rare ids (R,), likeliest first (ties: lowest id first), and their log q. Sorting ~46k ids took
        3.5 ms, as long as five decoding steps of the cpu preset, so the order is kept until a buffer changes."""
        key = _versions(self.class_of, self.log_q)
        if self._cached_rare is None or self._cached_rare[0] != key:
            rare = (self.class_of == self.head_ids.numel()).nonzero().squeeze(1)  # ascending ids
            order = torch.argsort(self.log_q[rare], descending=True, stable=True)
            self._cached_rare = key, rare[order], self.log_q[rare][order]
        return self._cached_rare[1], self._cached_rare[2]

    def train(self, mode: bool = True) -> CompactHead:
        """Forget the decoding cache on every switch: a fused optimizer step (torch's fused AdamW) updates the
        weights without bumping their _version, and evaluations between training steps read a stale matrix
        otherwise (the cpu preset's validation loss stuck at 3.2 from step 500 on)."""
        self._cached_matrix = None
        return super().train(mode)

    def _class_rows(self) -> torch.Tensor:
        return torch.cat([self.wte[0].weight[self.head_ids], self.other])  # (K+1, C)

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, K+1): the K frequent ids, then "other"."""
        return x @ self.output_matrix()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (B, T, V) whose softmax is exactly the head's distribution. index_select, not
        [..., class_of]: 0.14 against 0.37 ms at (4, 4097) -> (4, 50257) on a 2-core Zen 5."""
        return torch.index_select(self.class_logits(x), -1, self.class_of) + self.log_q

    def loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean of -log p(target) over targets that are not IGNORE_INDEX, without the (B, T, V) logits."""
        targets = targets.reshape(-1)
        counted = targets != IGNORE_INDEX
        safe = torch.where(counted, targets, 0)
        logits = _at_least_float32(self.class_logits(x)).view(-1, self.head_ids.numel() + 1)
        nll = F.cross_entropy(logits, torch.where(counted, self.class_of[safe], IGNORE_INDEX),
                              ignore_index=IGNORE_INDEX, reduction="sum")
        nll = nll - (self.log_q[safe] * counted).sum()
        return nll / counted.sum().clamp(min=1)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        if cfg.vocab_head:
            self.lm_head = CompactHead(cfg, self.transformer.wte)
        else:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
            self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2 paper §2.3: scale residual projections by 1/sqrt(N), N = 2 residual adds per block.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # the tied head is counted once
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) ids -> logits (B, T, V) and, given targets (B, T), the mean cross-entropy over
        targets that are not IGNORE_INDEX (logits are then None for a compact head, which never builds
        them). With a kv_cache, idx continues the cached sequence."""
        x = self.hidden(idx, kv_cache)
        if targets is None:
            return self.lm_head(x), None  # (B, T, V)
        if isinstance(self.lm_head, CompactHead):
            return None, self.lm_head.loss(x, targets)
        logits = self.lm_head(x)
        return logits, F.cross_entropy(_at_least_float32(logits).view(-1, logits.size(-1)), targets.reshape(-1),
                                       ignore_index=IGNORE_INDEX)

    def hidden(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) -> the final layer norm's output (B, T, C), which the head turns into logits. Decoding
        needs the head at the last position only, and a compact head samples without full logits."""
        T = idx.size(1)
        if kv_cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
            pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        else:
            pos = kv_cache.positions(T)  # (B, T) or (1, T)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        x = dropout(x, self.config.dropout, self.training)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        return self.transformer.ln_f(x)


def _versions(*tensors: torch.Tensor) -> tuple:
    """What identifies these tensors' contents: in-place updates bump a tensor's _version, and .to() or a
    load makes new storage."""
    return tuple((t.data_ptr(), t._version) for t in tensors)
