"""What this machine can do at most, measured, for `slm bench` to set its figures beside: matmul FLOP/s in
float32 and bfloat16 at the shapes a model's training multiplies (and one large square, where a GEMM runs
nearest its peak), and the bandwidth at which the cores read memory. Training's share is its model FLOP/s over
the best GEMM of its dtype; decoding at batch 1 is bound by the bytes a step reads (the weights it multiplies
by and the KV cache), so its share is those bytes times tokens/s over the read bandwidth.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from slm.config import ModelConfig

SECONDS = 0.2  # each figure: the best of three runs of about this long, after one untimed call
SQUARE = 2048  # (2048 x 2048) @ (2048 x 2048): 17 GFLOP, large enough to run at a CPU's or GPU's peak
DRAM_BYTES = 512 << 20  # far above any last-level cache: what the cores can pull from memory
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Dense (no sparsity) bf16 tensor-core peak FLOP/s from NVIDIA's datasheets, matched in order against
# torch.cuda.get_device_name(): the PCIe H100 before the name that also matches it.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L4", 121e12))


def best_rate(work: Callable[[], object], amount: float, device: torch.device, seconds: float = SECONDS) -> float:
    """`amount` per second of `work` (amount is what one call does): the best of three timed runs."""
    def wait() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    work()
    wait()
    calls, best = 1, 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            work()
        wait()
        elapsed = time.perf_counter() - start
        best = max(best, calls * amount / elapsed)
        calls = max(1, round(calls * seconds / elapsed))  # the next runs last about `seconds`
    return best


def gemm_shapes(model: ModelConfig, tokens: int) -> dict[str, tuple[int, int, int]]:
    """(m, k, n) of the forward matmuls a training micro-batch of `tokens` makes, by weight, and the square."""
    c = model.n_embd
    return {"attention qkv": (tokens, c, 3 * c), "attention out": (tokens, c, c), "mlp up": (tokens, c, 4 * c),
            "mlp down": (tokens, 4 * c, c), "head": (tokens, c, head_rows(model)),
            "square": (SQUARE, SQUARE, SQUARE)}


def gemm_flops(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> float:
    m, k, n = shape
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    out = torch.empty(m, n, dtype=dtype, device=device)
    return best_rate(lambda: torch.mm(a, b, out=out), 2 * m * k * n, device)


def read_bandwidth(nbytes: int, device: torch.device) -> float:
    """Bytes/s of summing a float32 buffer of `nbytes`, which reads each byte once (a reduction writes nothing)."""
    buffer = torch.ones(nbytes // 4, device=device)
    return best_rate(buffer.sum, buffer.numel() * 4, device)


def head_rows(model: ModelConfig) -> int:
    """The head's rows a token is multiplied by: vocab_size of the tied embedding, a compact head's classes."""
    return model.vocab_head + 1 if model.vocab_head else model.vocab_size


def multiplied_weights(model: ModelConfig) -> int:
    """The weights a token is multiplied by: 12 * n_embd^2 a block (c_attn 3, attn.c_proj 1, c_fc 4,
    mlp.c_proj 4) and the head's rows; embedding lookups multiply nothing."""
    return model.n_layer * 12 * model.n_embd**2 + head_rows(model) * model.n_embd


def decode_bytes_per_token(model: ModelConfig, weight_bytes: float, context: float) -> float:
    """Bytes a batch-1 decoding step reads at `context` earlier positions: its multiplied weights and the
    cached keys and values (2 * n_layer * n_embd * context), all of `weight_bytes` each."""
    return (multiplied_weights(model) + 2 * model.n_layer * model.n_embd * context) * weight_bytes


def measure(models: list[ModelConfig], tokens: list[int], device: torch.device,
            cache_bytes: int | None = None) -> dict[str, object]:
    """GEMM FLOP/s of each dtype at every model's shapes (micro-batches of `tokens` each) and the peak, the best
    of them; the read bandwidth from memory and, with `cache_bytes` (what a decoding step reads), of a buffer
    that size, which a cache may hold."""
    gemm: dict[str, dict[str, float]] = {}
    for dtype_name, dtype in DTYPES.items() if models else ():
        rates = {}
        for model, n in zip(models, tokens):
            for name, shape in gemm_shapes(model, n).items():
                rates[f"{name} {shape[0]}x{shape[1]}x{shape[2]}"] = gemm_flops(shape, dtype, device)
        gemm[dtype_name] = rates
    bandwidth = {"memory": read_bandwidth(DRAM_BYTES, device)}
    if cache_bytes:
        bandwidth["decode working set"] = read_bandwidth(cache_bytes, device)
    return {"gemm_flops": gemm, "peak_flops": {d: max(rates.values()) for d, rates in gemm.items()},
            "read_bytes_per_s": bandwidth, "working_set_bytes": cache_bytes}


def train_flops_per_token(model: ModelConfig) -> int:
    """Training FLOPs per token as PaLM counts them for MFU (Chowdhery et al. 2022, appendix B; nanoGPT's
    estimate_mfu): 6 per multiplied weight (2 forward, 4 backward), plus 12 * n_layer * n_embd * block_size
    for attention's scores and weighted sums."""
    return 6 * multiplied_weights(model) + 12 * model.n_layer * model.n_embd * model.block_size


def model_flops_utilization(model: ModelConfig, tokens_per_s: float, device: torch.device) -> float | None:
    """The share of the GPU's dense bf16 peak that training tokens/s stands for, whatever the dtype, as MFU
    is quoted; None off CUDA or on a GPU missing from PEAK_BF16_FLOPS."""
    if device.type != "cuda":
        return None
    gpu = torch.cuda.get_device_name(device)
    peak = next((flops for name, flops in PEAK_BF16_FLOPS if name in gpu), None)
    return train_flops_per_token(model) * tokens_per_s / peak if peak else None
