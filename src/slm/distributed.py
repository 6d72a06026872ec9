"""Data-parallel training on PyTorch's own stack: torchrun's environment, a process group, DDP.

Launched by `torchrun --nproc_per_node N -m slm train ...` (or `slm train --nproc N`, which only builds that
command line), every process trains the same model on its slice of each global batch; without torchrun's
variables everything here is a no-op for one process. NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from slm.device import pick_device


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device_name: str) -> tuple[World, torch.device]:
    """This process's place in the world (from torchrun's RANK, LOCAL_RANK, WORLD_SIZE) and its device."""
    if "RANK" not in os.environ:
        return World(), pick_device(device_name)
    world = World(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, world: World, device: torch.device, fsdp: bool = False) -> torch.nn.Module:
    """DDP replicates the model; FSDP2 shards each block and then the rest (embeddings, tied head, final
    norm) in place, so the optimizer must be built after this."""
    if not world.distributed:
        return model
    if fsdp:
        for block in model.transformer.h:
            fully_shard(block)
        return fully_shard(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def gradient_sync(model: torch.nn.Module, world: World, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)
    elif world.distributed and not enabled:
        return model.no_sync()
    return contextlib.nullcontext()


def full_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict]:
    """The full model state dict (None when the model is not sharded: it holds it already) and the full
    optimizer state keyed by parameter name, whatever the sharding, so a checkpoint resumes with or without
    FSDP and on any number of processes. A collective under FSDP: every process calls it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=is_sharded(model))
    weights = get_model_state_dict(model, options=options) if is_sharded(model) else None
    return weights, get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load full_states' optimizer state: through FSDP's loader when sharded, else by mapping parameter
    names to the optimizer's own order (the name-keyed loader needs a process group)."""
    if is_sharded(model):
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    groups = [{**saved, "params": [index[name] for name in saved["params"]]} for saved in state["param_groups"]]
    optimizer.load_state_dict({"state": {index[name]: value for name, value in state["state"].items()},
                               "param_groups": groups})


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
