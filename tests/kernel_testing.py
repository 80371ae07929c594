"""What the kernel test files share: where kernels can run, and closeness measured against the largest entry."""

import os

import pytest
import torch

from lora_mem.kernels._common import HAS_TRITON

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Without CUDA the kernels run through Triton's interpreter, which tests/conftest.py switches on before triton loads.
KERNELS_RUNNABLE = HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
requires_kernels = pytest.mark.skipif(not KERNELS_RUNNABLE, reason="needs triton with CUDA or TRITON_INTERPRET=1")


def assert_close_scaled(got, expected, atol, rtol, name=""):
    """torch.testing.assert_close with atol relative to the expected tensor's largest entry: a reduction's rounding
    error scales with the size of its terms, not with the (possibly cancelled) entry."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, atol=atol * scale, rtol=rtol,
                               msg=(lambda m: f"{name}: {m}") if name else None)
