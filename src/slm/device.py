"""Where the model runs and in which precision, one decision shared by every stage; this process's place among
a run's processes (torchrun's, read by training.distributed.setup); and the machine, as benchmarks record it."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from slm.errors import SlmError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SlmError("--device cuda was asked for but CUDA is not available; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SlmError("--device mps was asked for but Apple MPS is not available; use --device cpu or auto")
    if name not in ("cpu", "cuda", "mps"):
        raise SlmError(f"--device must be auto, cpu, cuda or mps (got {name!r})")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX). Elsewhere PyTorch emulates bf16
    matmuls through float32 conversions, slower than float32 itself. torch.cpu has no public query; these
    private ones exist since torch 2.1 and are what PyTorch's own tests use."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


CPU_BF16_ENV = "SLM_CPU_BF16"


def auto_uses_bf16_on_cpu() -> bool:
    """What `--dtype auto` decides on a CPU: bfloat16 where it is native. SLM_CPU_BF16=1 or 0 overrides the
    detection, so that auto resolves to bfloat16 or float32 on any CPU: the tests run both resolutions on
    every machine, and a user can pin either for every command at once."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise SlmError(f"{CPU_BF16_ENV} must be 1 (auto picks bfloat16 on the CPU) or 0 (float32), got {forced!r}; "
                       f"unset it to let slm detect the CPU")
    return cpu_has_bf16()


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on CUDA where supported (float16 on older GPUs) and on CPUs with native bf16 (see
    auto_uses_bf16_on_cpu), else float32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and auto_uses_bf16_on_cpu():
            return torch.bfloat16
        return torch.float32
    return _DTYPES[name]


def should_compile(setting: str, device: torch.device) -> bool:
    """--compile auto compiles on CUDA only: on CPUs it measured slower than eager (benchmarks/README.md)."""
    return setting == "on" or setting == "auto" and device.type == "cuda"


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile with the backend SLM_COMPILE_BACKEND names (default: inductor). The tests compile with
    "eager", which runs every compiled code path (the wrappers, graph breaks) in seconds on any CPU."""
    return torch.compile(model, backend=os.environ.get("SLM_COMPILE_BACKEND", "inductor"))


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; a no-op in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS.

    Each training step allocates and frees several (B*T, vocab) float tensors of hundreds of MB. By default
    glibc hands such blocks straight back with munmap, and the next step page-faults them in again: on a
    2-core CPU that spent half of all CPU time in the kernel and cost ~1.4x in tokens/s."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    except (OSError, AttributeError):  # musl or another libc without mallopt: keep its defaults
        pass


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, object]:
    """What a benchmark records of the hardware and software it ran on."""
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
