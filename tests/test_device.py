"""Which precision `--dtype auto` picks on a CPU, and its override."""

import pytest
import torch

from slm.device import cpu_has_bf16, pick_dtype
from slm.errors import SlmError

CPU = torch.device("cpu")


def test_auto_resolves_as_the_override_says_and_explicit_dtypes_ignore_it(auto_resolution):
    assert pick_dtype("auto", CPU) == getattr(torch, auto_resolution)
    assert pick_dtype("float32", CPU) == torch.float32
    assert pick_dtype("bfloat16", CPU) == torch.bfloat16


def test_without_the_override_auto_follows_the_cpu(monkeypatch):
    monkeypatch.delenv("SLM_CPU_BF16")
    assert pick_dtype("auto", CPU) == (torch.bfloat16 if cpu_has_bf16() else torch.float32)


def test_a_bad_override_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SLM_CPU_BF16", "yes")
    with pytest.raises(SlmError, match="SLM_CPU_BF16 must be 1 .* or 0"):
        pick_dtype("auto", CPU)
