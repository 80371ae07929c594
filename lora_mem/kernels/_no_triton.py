"""What the kernel modules use of ``triton`` while they are imported, for a machine without it (triton ships for
Linux only): kernels and configs are defined as usual and never launched, since the kernel policy takes the PyTorch
references there (lora_mem.kernels.policy)."""

from __future__ import annotations


def jit(fn):
    return fn


def autotune(*args, **kwargs):
    return lambda fn: fn


class Config:
    def __init__(self, kwargs: dict, num_warps: int = 4, num_stages: int = 3):
        self.kwargs, self.num_warps, self.num_stages = kwargs, num_warps, num_stages


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
