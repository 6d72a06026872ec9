"""Data-parallel training on PyTorch's own stack: torchrun's environment, a process group, DDP.

Launched by `torchrun --nproc_per_node N -m slm train ...` (or `slm train --nproc N`, which only builds that
command line), every process trains the same model on its slice of each global batch; without torchrun's
variables everything here is a no-op for one process. NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from slm.device import World, pick_device
from slm.errors import SlmError


def setup(device_name: str, collective_timeout: float = 600.0) -> tuple[World, torch.device]:
    """This process's place in the world (from torchrun's RANK, LOCAL_RANK, WORLD_SIZE) and its device.
    A collective that waits longer than `collective_timeout` seconds for the other processes raises instead
    of waiting for ever, so a stopped or hung process cannot make the others unkillable."""
    if "RANK" not in os.environ:
        return World(), pick_device(device_name)
    world = World(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        die_with_parent()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=collective_timeout))
    return world, device


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Ask Linux to send this process `signum` when its parent dies. torchrun starts each worker in a session
    of its own, so a torchrun killed outright (SIGKILL, or a second Ctrl-C) would otherwise leave its workers
    running with the GPUs they hold; the launcher asks the same of torchrun, with SIGTERM, so that torchrun
    stops its workers when `slm` itself is killed."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1  # from linux/prctl.h
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signum)


def initialized() -> bool:
    """Whether this process runs under torchrun (its process group is set up), whatever the world's size."""
    return dist.is_initialized()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(model: torch.nn.Module) -> None:
    """FSDP2: shard each block, then the rest (embeddings, tied head, final norm), in place: `model` stays
    the module whose state is saved, and the optimizer must be built after this."""
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)


def replicate(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP: a wrapper that all-reduces the gradients in backward."""
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def gradient_sync(trained: torch.nn.Module, world: World, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient reduction on all but the last micro-batch of a step. `trained` may be compiled:
    torch.compile's wrapper passes these methods through to the module it wraps."""
    if hasattr(trained, "set_requires_gradient_sync"):  # FSDP
        trained.set_requires_gradient_sync(enabled)
    elif world.distributed and not enabled:
        return trained.no_sync()
    return contextlib.nullcontext()


def full_states(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> tuple[dict | None, dict]:
    """The full model state dict (None when the model is not sharded: it holds it already) and the full state
    of the optimizers, merged and keyed by parameter name, whatever the sharding, so a checkpoint resumes with
    or without FSDP and on any number of processes. A collective under FSDP: every process calls it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=is_sharded(model))
    weights = get_model_state_dict(model, options=options) if is_sharded(model) else None
    return weights, get_optimizer_state_dict(model, optimizers, options=options)


def load_optimizer_state(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], state: dict) -> None:
    """Load full_states' optimizer state: through FSDP's loader when sharded, else by mapping parameter
    names to each optimizer's own order (the name-keyed loader needs a process group). An optimizer takes
    the saved groups whose parameters it holds."""
    if is_sharded(model):
        set_optimizer_state_dict(model, optimizers, state, options=StateDictOptions(full_state_dict=True))
        return
    names = {id(p): name for name, p in model.named_parameters()}
    for optimizer in optimizers:
        order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        index = {name: i for i, name in enumerate(order)}
        groups = [{**saved, "params": [index[name] for name in saved["params"]]} for saved in state["param_groups"]
                  if all(name in index for name in saved["params"])]
        optimizer.load_state_dict({"state": {index[name]: value for name, value in state["state"].items()
                                             if name in index}, "param_groups": groups})


def total(values: list[float], world: World, device: torch.device) -> list[float]:
    """The sum over all processes of each value (the values themselves in one process)."""
    if not world.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


@contextlib.contextmanager
def timeout_is_an_error(run_dir: Path, timeout: float) -> Iterator[None]:
    """A collective that timed out means another process stopped or hung: one line, and where to resume. Gloo
    and NCCL report such a collective as a RuntimeError saying so."""
    try:
        yield
    except RuntimeError as err:
        if not (initialized() and "timed out" in str(err).lower()):
            raise
        raise SlmError(f"a collective waited more than --collective-timeout {timeout:g} s for another process, "
                       f"which stopped or hung; the last good checkpoint is in {run_dir / 'last'} (resume with "
                       f"--resume)") from None


HANG_FOR_TESTS = "SLM_TEST_HANG_AT_STEP"


def hang_if_testing(world: World, step: int) -> None:
    """Tests of stopping a hung run set SLM_TEST_HANG_AT_STEP=N: after step N the last process skips the
    step's collectives and waits for a message nobody sends, as a crashed or deadlocked peer would."""
    if world.distributed and world.rank == world.world_size - 1 and os.environ.get(HANG_FOR_TESTS) == str(step):
        dist.recv(torch.zeros(1), src=0)
