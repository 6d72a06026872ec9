"""Causal attention's forward + backward on this CPU: SDPA's flash kernel against two matmuls around a float32
softmax (`slm.model.gpt.matmul_attention`), in bfloat16 and float32, at 4,096 tokens a batch (the `cpu` preset's)
over lengths 64 to 1,024, 4 heads of 64. It decides `slm.model.gpt.MATMUL_ATTENTION_MAX_T`.

    python benchmarks/cpu_attention.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from slm.device import keep_freed_memory
from slm.model.gpt import matmul_attention

HEADS, HEAD_DIM, TOKENS = 4, 64, 4096


def milliseconds(attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeats: int) -> float:
    grad = torch.randn_like(q)

    def step() -> None:
        attention(q, k, v).backward(grad)

    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    keep_freed_memory()  # as training does: the T x T buffers are reused, not faulted in again each call
    print("| tokens | batch | dtype | SDPA flash (ms) | matmul (ms) | flash / matmul |\n"
          "| ---: | ---: | --- | ---: | ---: | ---: |")
    for T in (64, 128, 256, 512, 1024):
        for dtype in (torch.bfloat16, torch.float32):
            q, k, v = (torch.randn(TOKENS // T, HEADS, T, HEAD_DIM, dtype=dtype, requires_grad=True) for _ in range(3))
            flash = milliseconds(lambda *t: F.scaled_dot_product_attention(*t, is_causal=True), q, k, v, args.repeats)
            matmul = milliseconds(lambda *t: matmul_attention(*t, dropout_p=0.0), q, k, v, args.repeats)
            print(f"| {T} | {TOKENS // T} | {str(dtype).removeprefix('torch.')} | {flash:.1f} | {matmul:.1f} | "
                  f"{flash / matmul:.2f} |")


if __name__ == "__main__":
    main()
