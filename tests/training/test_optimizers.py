import dataclasses

import pytest
import torch

from slm.config import ModelConfig, TrainConfig
from slm.model.gpt import GPT
from slm.training.loop import accumulate, step_optimizer
from slm.training.optimizers import build_optimizers, orthogonalise, set_learning_rate
from slm.training.state import learning_rate

SMALL = ModelConfig(vocab_size=101, block_size=8, n_layer=2, n_head=2, n_embd=16)


def names(model, params):
    by_id = {id(p): name for name, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


def test_muon_takes_the_blocks_weight_matrices_and_adamw_everything_else():
    model = GPT(dataclasses.replace(SMALL, vocab_head=10))  # a compact head's parameter stays on AdamW
    adamw, muon = build_optimizers(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    matrices = {f"transformer.h.{i}.{name}.weight" for i in range(2)
                for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert isinstance(muon, torch.optim.Muon) and names(model, muon.param_groups[0]["params"]) == matrices
    on_adamw = names(model, [p for group in adamw.param_groups for p in group["params"]])
    assert {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.other"} <= on_adamw
    assert on_adamw | matrices == {name for name, _ in model.named_parameters()} and not on_adamw & matrices


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_weight_decay_applies_to_matrices_only(optimizer):
    model = GPT(SMALL)
    adamw, *muon = build_optimizers(model, TrainConfig(weight_decay=0.1, optimizer=optimizer), torch.device("cpu"))
    decayed, plain = adamw.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])
    assert [group["weight_decay"] for m in muon for group in m.param_groups] == ([0.1] if muon else [])
    # fused on a CPU too: the per-tensor loop took 19 ms a step over the cpu preset's embedding, fused 6 ms
    assert adamw.defaults["fused"]


def test_muon_learning_rate_follows_the_same_schedule_from_its_own_peak():
    cfg = TrainConfig(optimizer="muon", learning_rate=1e-3, min_learning_rate=1e-4, muon_learning_rate=5e-3,
                      warmup_steps=10)
    adamw, muon = build_optimizers(GPT(SMALL), cfg, torch.device("cpu"))
    for step, progress, muon_lr in ((4, 0.0, 2.5e-3), (10, 0.0, 5e-3), (50, 1.0, 5e-4)):
        lr = learning_rate(step, progress, cfg)
        set_learning_rate([adamw, muon], lr, cfg)
        assert [group["lr"] for group in adamw.param_groups] == [lr, lr]
        assert muon.param_groups[0]["lr"] == pytest.approx(muon_lr)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_step_under_the_fp16_grad_scaler_applies_the_unscaled_update(optimizer):
    """The scaler unscales and steps each optimizer: scaled by a power of two and back, the gradients are the
    same bits, and so are the weights after the step."""
    x = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    scaled, plain = GPT(SMALL), GPT(SMALL)
    plain.load_state_dict(scaled.state_dict())
    cfg = TrainConfig(optimizer=optimizer)
    initial = {name: weight.clone() for name, weight in plain.state_dict().items()}
    for model, scaler in ((scaled, torch.amp.GradScaler("cpu", init_scale=2.0**12)),
                          (plain, torch.amp.GradScaler("cpu", enabled=False))):
        optimizers = build_optimizers(model, cfg, torch.device("cpu"))
        set_learning_rate(optimizers, 1e-2, cfg)
        accumulate(model, [(x, x)], torch.device("cpu"), torch.float32, scaler)
        step_optimizer(model, optimizers, scaler, grad_clip=1.0)
    for name, weight in plain.state_dict().items():
        assert torch.equal(scaled.state_dict()[name], weight), name
        assert not torch.equal(weight, initial[name]), f"{name} did not move"


def test_muon_orthogonalises_in_bfloat16_only_where_the_cpu_multiplies_it_natively(auto_resolution):
    _, muon = build_optimizers(GPT(SMALL), TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert muon.ns_dtype == getattr(torch, auto_resolution)  # float32 where bf16 would be emulated, 40x slower


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)], ids=["tall", "wide"])
def test_newton_schulz_flattens_the_singular_values_in_float32_as_in_torchs_bfloat16(shape):
    matrix = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ours = orthogonalise(matrix, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32)
    singular = torch.linalg.svdvals(ours)
    assert ours.dtype == torch.float32 and singular.min() > 0.6 and singular.max() < 1.25  # ~U V^T, as Muon wants
    torch.testing.assert_close(orthogonalise(matrix, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.bfloat16),
                               torch.optim._muon._zeropower_via_newtonschulz(matrix, (3.4445, -4.7750, 2.0315), 5,
                                                                               1e-7).float(), rtol=0, atol=0)


def test_muon_orthogonalises_q_k_and_v_of_the_fused_attention_matrix_each_on_its_own():
    """c_attn stacks three (16, 16) matrices; each gets an orthogonal update of AdamW's RMS (0.2 x lr), not
    a third of one orthogonal (48, 16) update."""
    model = GPT(SMALL)
    cfg = TrainConfig(optimizer="muon", weight_decay=0.0, muon_learning_rate=1e-2, learning_rate=1e-2)
    _, muon = build_optimizers(model, cfg, torch.device("cpu"))
    set_learning_rate([muon], 1e-2, cfg)
    c_attn = model.transformer.h[0].attn.c_attn.weight
    before = c_attn.detach().clone()
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)
    muon.step()
    for part in (c_attn.detach() - before).chunk(3):
        assert part.pow(2).mean().sqrt() == pytest.approx(0.2 * 1e-2, rel=0.2)
        singular = torch.linalg.svdvals(part / (0.2 * 1e-2 * 4))  # an orthogonal (16, 16) matrix's RMS is 1/4
        # five Newton-Schulz steps leave them near 1, not at it; a third of one (48, 16) update's block has
        # singular values up to 1.6 and a median of 0.64-0.74
        assert singular.median() > 0.8 and singular.max() < 1.25
