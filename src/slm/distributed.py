"""Data-parallel training on PyTorch's own stack: torchrun's environment, a process group, DDP.

Launched by `torchrun --nproc_per_node N -m slm train ...` (or `slm train --nproc N`, which only builds that
command line), every process trains the same model on its slice of each global batch; without torchrun's
variables everything here is a no-op for one process. NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
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


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    if not world.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


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
