import math

import pytest
import torch
import torch.nn.functional as F

from slm.config import ModelConfig, TrainConfig
from slm.model.gpt import GPT, IGNORE_INDEX, causal_attention
from slm.training.optimizers import build_optimizers

CFG = ModelConfig(vocab_size=101, block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(CFG).eval()


def test_changing_a_later_token_never_changes_earlier_logits(model):
    idx = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % CFG.vocab_size
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def manual_attention(attn, x):
    """The textbook masked softmax, the slow twin of scaled_dot_product_attention."""
    B, T, C = x.shape
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
    return attn.c_proj(y)


def test_fused_attention_equals_manual_masked_softmax(model):
    x = torch.randn(2, 10, CFG.n_embd, generator=torch.Generator().manual_seed(2))
    attn = model.transformer.h[0].attn
    torch.testing.assert_close(attn(x), manual_attention(attn, x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("T", [1, 9, 40])
def test_bfloat16_attention_on_a_cpu_is_sdpas_causal_attention_forward_and_backward(T, monkeypatch):
    g = torch.Generator().manual_seed(3)
    q, k, v, grad = (torch.randn(2, 3, T, 16, generator=g) for _ in range(4))

    def run(attention, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = attention(*leaves)
        out.backward(grad.to(dtype))
        return [out.float()] + [t.grad.float() for t in leaves]

    reference = run(lambda *t: F.scaled_dot_product_attention(*t, is_causal=True), torch.float32)
    with monkeypatch.context() as m:
        m.setattr(F, "scaled_dot_product_attention", None)  # the matmul path must not hand over to SDPA
        ours = run(lambda *t: causal_attention(*t, dropout_p=0.0), torch.bfloat16)
        dropped = causal_attention(*(t.to(torch.bfloat16) for t in (q, k, v)), dropout_p=1.0)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)
    assert not dropped.any()


def test_head_is_tied_to_the_token_embedding(model):
    assert model.lm_head.weight is model.transformer.wte.weight


def test_loss_is_mean_cross_entropy_over_counted_targets(model):
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, CFG.vocab_size, (2, 8), generator=g)
    targets = torch.randint(0, CFG.vocab_size, (2, 8), generator=g)
    targets[0, :5] = IGNORE_INDEX
    logits, loss = model(idx, targets)
    torch.testing.assert_close(logits, model(idx)[0])
    keep = targets != IGNORE_INDEX
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)


def test_untrained_loss_is_near_uniform(model):
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, CFG.vocab_size, (4, 16), generator=g)
    _, loss = model(idx, torch.randint(0, CFG.vocab_size, (4, 16), generator=g))
    assert abs(loss.item() - math.log(CFG.vocab_size)) < 0.3


def test_longer_than_block_size_is_refused(model):
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, CFG.block_size + 1, dtype=torch.long))


def test_gelu_is_gpt2_tanh_approximation(model):
    mlp = model.transformer.h[0].mlp
    x = torch.randn(3, CFG.n_embd)
    expected = mlp.c_proj(0.5 * mlp.c_fc(x) * (1 + torch.tanh(math.sqrt(2 / math.pi) * (
        mlp.c_fc(x) + 0.044715 * mlp.c_fc(x) ** 3))))
    torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=1e-5)


def test_parameter_count_counts_the_tied_head_once(model):
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_parameters() == sum(unique.values())
    assert model.num_parameters(non_embedding=True) == model.num_parameters() - CFG.block_size * CFG.n_embd


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    big = GPT(ModelConfig(vocab_size=101, block_size=16, n_layer=8, n_head=2, n_embd=64))
    std = big.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.002


def test_compact_head_keeps_the_k_most_frequent_ids(compact):
    model, counts = compact
    assert set(model.lm_head.head_ids.tolist()) == set(counts.topk(10).indices.tolist())


def test_compact_head_gives_rare_ids_p_other_times_their_smoothed_training_frequency(compact):
    """The head's distribution against one built by hand from the counts: softmax over the 10 most frequent
    ids' embedding rows and "other", then p(other) * q(id) for each rare id, q its add-one smoothed share."""
    model, counts = compact
    head = model.lm_head
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        head.other.copy_(torch.randn(1, 32, generator=g, dtype=torch.float64))  # not zero: "other" must matter
    x = torch.randn(3, 16, 32, generator=g, dtype=torch.float64)
    frequent = counts.topk(10).indices
    rare = torch.tensor([i for i in range(101) if i not in frequent])
    rows = torch.cat([model.transformer.wte.weight[frequent], head.other])  # (11, 32)
    classes = (x @ rows.T).softmax(-1)  # (3, 16, 11)
    smoothed = counts[rare].double() + 1
    q = smoothed / smoothed.sum()
    expected = torch.empty(3, 16, 101, dtype=torch.float64)
    expected[..., frequent] = classes[..., :10]
    expected[..., rare] = classes[..., 10:] * q
    logits = head(x)
    assert logits.shape == (3, 16, 101) and logits.dtype == torch.float64
    torch.testing.assert_close(logits.softmax(-1), expected, atol=1e-12, rtol=0)


def test_compact_head_loss_equals_cross_entropy_of_the_expanded_distribution(compact):
    model, _ = compact
    g = torch.Generator().manual_seed(2)
    idx, targets = torch.randint(0, 101, (2, 16), generator=g), torch.randint(0, 101, (2, 16), generator=g)
    targets[1, :4] = IGNORE_INDEX
    logits, _ = model(idx)
    _, loss = model(idx, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 101), targets.view(-1)), atol=1e-12, rtol=0)


def test_every_id_even_one_never_seen_gets_a_finite_loss(compact):
    model, _ = compact
    idx = torch.zeros(101, 1, dtype=torch.long)
    targets = torch.arange(101).view(101, 1)
    per_id = [model(idx[i:i + 1], targets[i:i + 1])[1].item() for i in range(101)]
    assert all(math.isfinite(v) for v in per_id)
    assert per_id[7] > per_id[int(model.lm_head.head_ids[0])]


def test_compact_head_is_tied_to_the_token_embedding(compact):
    model, _ = compact
    head_id = int(model.lm_head.head_ids[0])
    x = torch.randn(1, 1, 32, dtype=torch.float64)
    expected = x[0, 0] @ model.transformer.wte.weight[head_id]
    torch.testing.assert_close(model.lm_head(x)[0, 0, head_id], expected)
    assert not any(name.startswith("lm_head.wte") for name in model.state_dict())


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_an_evaluation_after_an_optimizer_step_sees_the_new_weights(compact, optimizer):
    """As a run evaluates: the fused AdamW a run builds updates the embedding without bumping its _version."""
    model, _ = compact
    adamw, *_ = optimizers = build_optimizers(model, TrainConfig(optimizer=optimizer), torch.device("cpu"))
    assert adamw.defaults["fused"]
    idx = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        model(idx)  # fills the cache
    model.train()
    model(idx, idx)[1].backward()
    for o in optimizers:
        o.step()
    model.eval()
    with torch.no_grad():
        after = model(idx)[0]
    with torch.enable_grad():
        expected = model(idx)[0].detach()  # built afresh: autograd never reads the cache
    torch.testing.assert_close(after, expected, atol=1e-12, rtol=0)


def test_the_compact_heads_decoding_cache_follows_weight_updates(compact):
    model, _ = compact
    x = torch.randn(2, 1, 32, dtype=torch.float64)
    with torch.no_grad():
        before = model.lm_head(x)
        model.transformer.wte.weight.mul_(2.0)  # in place, as an optimizer step updates it
        model.lm_head.other.add_(1.0)
        after = model.lm_head(x)
    with torch.enable_grad():
        expected = model.lm_head(x).detach()
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, atol=1e-12, rtol=0)
