"""The machine's limits that `slm bench` sets its figures beside: the counts are checked against independent
ones, the timing against work of a known length."""

import dataclasses
import time

import pytest
import torch

from slm.config import ModelConfig
from slm.model.gpt import GPT
from slm.peak import best_rate, decode_bytes_per_token, gemm_shapes, measure, train_flops_per_token

FULL = ModelConfig(vocab_size=1000, block_size=64, n_layer=2, n_head=4, n_embd=256)


def test_training_flops_per_token_count_each_multiplied_weight_six_times_plus_attention():
    # Counted independently, as nanoGPT's estimate_mfu does: 6 FLOPs for every parameter but the position
    # table. Only biases and norms (13 x n_embd a block) are in that count and not in PaLM's.
    parameters = GPT(FULL).num_parameters(non_embedding=True)
    assert train_flops_per_token(FULL) == pytest.approx(6 * parameters + 12 * 2 * 256 * 64, rel=1e-2)
    compact = dataclasses.replace(FULL, vocab_head=100)  # multiplies by 101 rows of the embedding, not 1,000
    assert train_flops_per_token(FULL) - train_flops_per_token(compact) == 6 * (1000 - 101) * 256


@pytest.mark.parametrize("vocab_head", [0, 100])
def test_a_decoding_step_reads_the_blocks_matrices_the_heads_rows_and_the_cache(vocab_head):
    config = dataclasses.replace(FULL, vocab_head=vocab_head)
    model = GPT(config)
    matrices = sum(p.numel() for name, p in model.named_parameters() if name.startswith("transformer.h.")
                   and p.dim() == 2)
    head = (vocab_head + 1 if vocab_head else 1000) * 256
    kv = 2 * 2 * 256 * 10  # keys and values, 2 layers, 10 positions
    assert decode_bytes_per_token(config, 2, context=10) == 2 * (matrices + head + kv)


def test_best_rate_is_the_amount_over_the_time_a_call_takes():
    rate = best_rate(lambda: time.sleep(0.01), 1.0, torch.device("cpu"), seconds=0.05)
    assert 10 < rate <= 100  # a call sleeps at least 10 ms; a busy machine may make it longer, never shorter


def test_the_peak_is_the_best_gemm_of_each_dtype_and_bandwidth_is_measured_where_asked():
    tiny = ModelConfig(vocab_size=300, block_size=8, n_layer=1, n_head=2, n_embd=16)
    limits = measure([tiny], [32], torch.device("cpu"), cache_bytes=1 << 20)
    names = {f"{name} {m}x{k}x{n}" for name, (m, k, n) in gemm_shapes(tiny, 32).items()}
    assert "head 32x16x300" in names and "mlp down 32x64x16" in names
    for dtype in ("float32", "bfloat16"):
        assert set(limits["gemm_flops"][dtype]) == names
        assert limits["peak_flops"][dtype] == max(limits["gemm_flops"][dtype].values()) > 0
    assert set(limits["read_bytes_per_s"]) == {"memory", "decode working set"}
    assert all(rate > 0 for rate in limits["read_bytes_per_s"].values())
    assert measure([], [], torch.device("cpu"))["gemm_flops"] == {}  # `slm bench generate`: bandwidth only
