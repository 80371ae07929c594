"""What every Triton kernel module here shares: the guarded triton import and launch helpers.

Which path runs (kernels or references) is the caller's :class:`lora_mem.kernels.policy.KernelPolicy`. Under
``TRITON_INTERPRET=1`` the kernels run on the CPU through Triton's interpreter, which is how CI checks them.
"""

from __future__ import annotations

import os

import torch

try:  # guarded: a machine without triton still imports this module and takes the reference path
    import triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is installed wherever the tests run
    triton = None
    HAS_TRITON = False

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_INTERPRETED_KERNELS: dict = {}


def interpreted(kernel):
    """The interpreter version of a ``@triton.jit`` kernel.

    ``triton.jit`` picks compiled vs interpreted when the decorator runs, i.e. when this module is imported. If it was
    imported before ``TRITON_INTERPRET=1`` was set (another test imported it first, or the variable is set per call),
    wrap the kernel's Python function in the interpreter now. Only the kernels themselves are wrapped, so they call no
    ``@triton.jit`` function: no helpers of ours, and none of triton's own (``tl.zeros``, ``tl.cdiv`` are
    ``@triton.jit`` functions in ``triton.language.standard``; the kernels use ``tl.full`` and ``//`` instead).
    """
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    if kernel not in _INTERPRETED_KERNELS:
        _INTERPRETED_KERNELS[kernel] = InterpretedFunction(kernel.fn)
    return _INTERPRETED_KERNELS[kernel]


def rank_block(rank: int) -> int:
    """The rank padded to a power of two, at least 16 (tl.dot's minimum tile side)."""
    return max(16, triton.next_power_of_2(rank))


def dot_flags(dtype: torch.dtype, interpret: bool, tf32: bool = False) -> tuple[bool, str]:
    """(DOT_FP32, INPUT_PRECISION) for operands of ``dtype``.

    DOT_FP32: Triton's interpreter (3.x) multiplies bf16 tiles as their raw uint16 bits, so under the interpreter bf16
    operands are upcast first; a bf16 x bf16 product is exact in fp32, so this is the same sum the tensor cores form.
    INPUT_PRECISION: fp32 operands in TF32 only when ``tf32`` (the kernel policy's switch, off by default, so fp32
    stays fp32-accurate like cuBLAS).
    """
    dot_fp32 = interpret and dtype == torch.bfloat16
    precision = "tf32" if (dtype == torch.float32 and tf32) else "ieee"
    if dtype != torch.float32:
        precision = "tf32"  # ignored for 16-bit operands; the compiler's default
    return dot_fp32, precision


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (torch caches the device's properties after the first call)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


_TARGET_LIMITS: dict = {}


def target_limits() -> tuple[int, int, int]:
    """(compute capability as 90 / 80, opt-in shared memory per block in bytes, SM count) of the GPU Triton compiles
    for: its active driver's current device, where every launch runs. Asked of Triton rather than torch, so that a
    stand-in driver (bench/perf/compile_check.py) answers for a GPU that is not there."""
    from triton.runtime.driver import driver

    active = driver.active
    device = active.get_current_device()
    key = (active, device)  # the driver itself, not its id: a stand-in replaced by another must not reuse an entry
    if key not in _TARGET_LIMITS:
        props = active.utils.get_device_properties(device)
        _TARGET_LIMITS[key] = (active.get_current_target().arch, props["max_shared_mem"],
                               props["multiprocessor_count"])
    return _TARGET_LIMITS[key]
