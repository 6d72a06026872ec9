"""The CUDA path, which the CPU suite cannot take: bf16 and fp16 autocast (fp16 with the grad scaler), fused
AdamW, torch.compile (on by default on CUDA), FSDP + compile under torchrun, and Muon with fp16 and with
FSDP, each a few steps of the tiny preset in a fresh `slm train` process. Skipped without CUDA;
benchmarks/gpu_check.sh runs them on a GPU."""

import math

import pytest
import torch

from conftest import losses, train
from slm.runs.checkpoint import load_model, load_trainer_state

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs these tests on one)")]

SETTINGS = {  # conftest.train's flags on top of its 12 tiny steps, by run name
    "bfloat16": ["--dtype", "bfloat16", "--compile", "off"],
    "float16": ["--dtype", "float16", "--compile", "off"],
    # What a user gets on CUDA: bf16 (fp16 before Ampere), compiled, a sample at each evaluation.
    "defaults": ["--dtype", "auto", "--compile", "auto", "--sample-tokens", "8"],
    # The README's FSDP command on one process: torchrun, sharded even so, compiled by default.
    "fsdp": ["--dtype", "auto", "--compile", "auto", "--sample-tokens", "8", "--nproc", "1", "--fsdp"],
    # Muon beside AdamW: the fp16 grad scaler unscales and steps each; and sharded and compiled, as by default.
    "muon-float16": ["--dtype", "float16", "--compile", "off", "--optimizer", "muon"],
    "muon-fsdp": ["--dtype", "auto", "--compile", "auto", "--nproc", "1", "--fsdp", "--optimizer", "muon"],
}


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory, tiny_data):
    """cuda_run(name): a folder holding `run/`, trained on CUDA with SETTINGS[name] the first time a test
    asks for it, and `inductor/`, where torch.compile's inductor wrote the kernels it generated, if any."""
    folders = {}

    def get(name: str):
        if name not in folders:
            folder = tmp_path_factory.mktemp(name)
            with pytest.MonkeyPatch.context() as env:
                env.setenv("TORCHINDUCTOR_CACHE_DIR", str(folder / "inductor"))
                env.delenv("SLM_COMPILE_BACKEND", raising=False)  # a user's backend, inductor
                train(tiny_data, folder / "run", "--device", "cuda", *SETTINGS[name])
            folders[name] = folder
        return folders[name]

    return get


def check_trained(run):
    """Finite losses, a validation loss that falls, and checkpoints that load and give finite logits."""
    assert all(math.isfinite(loss) for loss in losses(run, "loss"))
    first, last = losses(run, "val_loss")
    assert last < first
    for which in ("best", "last"):
        model, _, _ = load_model(run / which, device="cuda")
        logits, _ = model(torch.tensor([[50256, 464, 3797]], device="cuda"))
        assert torch.isfinite(logits).all()


def kernels_compiled(folder) -> bool:
    return any((folder / "inductor").rglob("*.py"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_on_cuda_trains_and_saves_checkpoints_that_load(cuda_run, dtype):
    folder = cuda_run(dtype)
    check_trained(folder / "run")
    assert not kernels_compiled(folder)  # --compile off: precision alone is under test


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_grad_scaler_scales_float16_only_and_its_scale_is_saved_for_resume(cuda_run, dtype):
    scaler = load_trainer_state(cuda_run(dtype) / "run" / "last")["scaler"]
    if dtype == "float16":
        assert 0 < scaler["scale"] < math.inf
    else:
        assert scaler == {}  # bf16 has float32's exponent range: nothing to scale


def test_adamw_is_fused_on_cuda(cuda_run):
    groups = load_trainer_state(cuda_run("bfloat16") / "run" / "last")["optimizer"]["param_groups"]
    assert groups and all(group["fused"] for group in groups)


# The same 12 steps in bf16 through other kernels (compiled, fused differently) round differently; a wrong
# gradient or a lost update moves the loss far more than this.
BF16_RUNS_AGREE = 0.02


def test_cuda_defaults_compile_the_model_and_train_as_eager_does(cuda_run):
    folder = cuda_run("defaults")
    assert kernels_compiled(folder)
    check_trained(folder / "run")
    eager = cuda_run("bfloat16" if torch.cuda.is_bf16_supported() else "float16") / "run"
    assert losses(folder / "run", "loss") == pytest.approx(losses(eager, "loss"), rel=BF16_RUNS_AGREE)


def test_fsdp_with_compile_under_torchrun_saves_checkpoints_that_load(cuda_run):
    folder = cuda_run("fsdp")
    assert kernels_compiled(folder)
    check_trained(folder / "run")
    unsharded = cuda_run("defaults") / "run"
    assert losses(folder / "run", "loss") == pytest.approx(losses(unsharded, "loss"), rel=BF16_RUNS_AGREE)


@pytest.mark.parametrize("name", ["muon-float16", "muon-fsdp"])
def test_muon_trains_on_cuda_under_the_fp16_grad_scaler_and_sharded_with_compile(cuda_run, name):
    check_trained(cuda_run(name) / "run")
    groups = load_trainer_state(cuda_run(name) / "run" / "last")["optimizer"]["param_groups"]
    assert any("momentum" in group for group in groups)  # Muon's group, saved beside AdamW's
