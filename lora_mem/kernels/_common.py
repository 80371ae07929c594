"""What every Triton kernel module here shares: the guarded triton import, the dispatch switches and launch helpers.

``LORA_MEM_KERNELS`` (auto | triton | reference) picks kernels or references for the LoRA linears
(:func:`use_triton`); the RMSNorm / RoPE / SwiGLU kernels are opt-in on top of it (:func:`use_fused_ops`). Under
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


def dot_flags(dtype: torch.dtype, interpret: bool) -> tuple[bool, str]:
    """(DOT_FP32, INPUT_PRECISION) for operands of ``dtype``.

    DOT_FP32: Triton's interpreter (3.x) multiplies bf16 tiles as their raw uint16 bits, so under the interpreter bf16
    operands are upcast first; a bf16 x bf16 product is exact in fp32, so this is the same sum the tensor cores form.
    INPUT_PRECISION: fp32 follows torch's TF32 switch (off by default, so fp32 stays fp32-accurate like cuBLAS).
    """
    dot_fp32 = interpret and dtype == torch.bfloat16
    precision = "tf32" if (dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    if dtype != torch.float32:
        precision = "tf32"  # ignored for 16-bit operands; the compiler's default
    return dot_fp32, precision


_SM_COUNT: dict = {}


def sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


def use_triton(x: torch.Tensor) -> bool:
    """Whether :func:`lora_linear` takes the Triton kernels for input ``x``.

    ``LORA_MEM_KERNELS`` = ``auto`` (default): CUDA tensors -> Triton, CPU tensors -> reference;
    ``triton``: also CPU tensors, but only through the interpreter (``TRITON_INTERPRET=1``);
    ``reference``: the PyTorch reference everywhere.
    """
    mode = os.environ.get("LORA_MEM_KERNELS", "auto").strip().lower() or "auto"
    if mode not in ("auto", "triton", "reference"):
        raise ValueError(f"LORA_MEM_KERNELS must be auto, triton or reference, got {mode!r}")
    if mode == "reference" or not HAS_TRITON:
        return False
    if x.is_cuda:
        return True
    return mode == "triton" and x.device.type == "cpu" and interpreting()


def use_fused_ops(x: torch.Tensor) -> bool:
    """Whether the RMSNorm / RoPE / SwiGLU kernels (lora_mem/kernels/rms_norm.py, rope.py, swiglu.py) run for ``x``.

    Opt-in, unlike the LoRA linear: they have not yet been timed on a GPU, and the issue asks for them only where
    they pay off. ``LORA_MEM_KERNELS=triton`` (which on CPU also needs ``TRITON_INTERPRET=1``) or
    ``LORA_MEM_FUSED_OPS=1`` turns them on wherever :func:`use_triton` would run kernels."""
    wanted = (os.environ.get("LORA_MEM_FUSED_OPS", "0").strip() == "1"
              or os.environ.get("LORA_MEM_KERNELS", "auto").strip().lower() == "triton")
    return wanted and use_triton(x)
