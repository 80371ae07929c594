"""What every Triton kernel module here shares: the triton import, launch helpers, and what the two LoRA GEMMs
(lora_linear, multi_lora_linear) share of their configs and of the measures that prune them.

Which path runs (kernels or references) is the caller's :class:`lora_mem.kernels.policy.KernelPolicy`. Under
``TRITON_INTERPRET=1`` the kernels run on the CPU through Triton's interpreter, which is how CI checks them.

Where triton is not installed (it ships for Linux only), ``triton`` here is :mod:`lora_mem.kernels._no_triton`: the
kernel modules still define their kernels and configs at import, and the policy never launches them.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - tests/test_kernel_imports.py covers it in a process without triton
    from lora_mem.kernels import _no_triton as triton

    tl = None  # read only inside kernel bodies, which never run here
    HAS_TRITON = False

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_RANK = 128  # LoRA kernels: the whole rank fits one tile of at most 128 columns


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


# ---------------------------------------------------------------------------------------------------------------------
# What the two LoRA GEMMs (lora_linear's fused kernel, multi_lora_linear's product kernel) share of their configs
# ---------------------------------------------------------------------------------------------------------------------

# The tensor-core pool (bf16, fp16, fp32 in TF32) of both GEMMs; each module has its own pool for fp32 at full
# precision on the FMA units, where operand fragments sit in registers and these tiles would spill.
FUSED_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=5, num_warps=4),
]
# Under the interpreter autotuning measures nothing, so one small fixed config (blocks of 16 are tl.dot's minimum;
# GROUP_M = 2 still exercises the grouped launch order on test-sized problems).
INTERPRET_FUSED_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}
# Past these the tensor-core tiles spill (bench/perf/compile_check.py measures them): on sm_80, accumulator elements
# per thread; elsewhere, accumulator elements per thread times the operands' element size (fp32 in TF32 has twice
# the operand registers of bf16).
SM80_MAX_ACC_PER_THREAD = 64
ACC_BYTES = 256


def uses_tensor_cores(x: torch.Tensor, precision: str) -> bool:
    """Whether tl.dot runs on tensor cores for operands like x: every 16-bit dtype, fp32 only in TF32."""
    return x.dtype != torch.float32 or precision == "tf32"


def config_pool(configs, fp32_pool, tensor_cores: bool) -> list:
    """The configs of the launch's kind of dot: those of ``fp32_pool`` on the FMA units, the others on tensor cores."""
    return [c for c in configs if (c in fp32_pool) != tensor_cores]


def pipeline_smem(stage_bytes: int, num_stages: int, tensor_cores: bool) -> int:
    """Shared memory of a K-loop pipelined over num_stages whose stage loads stage_bytes: Hopper's tensor-core
    loop keeps every stage in shared memory, Ampere's and the FMA loop one fewer (what the compiler allocates)."""
    arch, _, _ = target_limits()
    return (num_stages if tensor_cores and arch >= 90 else num_stages - 1) * stage_bytes


def acc_per_thread(rows: int, cols: int, num_warps: int) -> float:
    return rows * cols / (32 * num_warps)
