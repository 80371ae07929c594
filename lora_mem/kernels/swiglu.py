"""SwiGLU's gating, silu(gate) * up: the PyTorch reference (model/qwen2.py's MLP) and a fused Triton forward/backward.

    y = silu(g) * u = g / (1 + exp(-g)) * u        g = gate_proj(x), u = up_proj(x), both (..., intermediate)

The reference writes silu(g) as a temporary and reads it back for the product (and autograd keeps it); the kernel
reads g and u once and writes y once (3 tensor passes instead of 5), in fp32 registers with one rounding. Backward
recomputes sigmoid(g) from the saved g and u rather than saving silu(g).

Kernels: ``_swiglu_fwd_kernel`` and ``_swiglu_bwd_kernel``, elementwise over the flattened (contiguous) tensors,
BLOCK elements per program, int64 offsets. Never in place: dg and du are new tensors.

Dispatch (:func:`swiglu`): the caller's :class:`lora_mem.kernels.policy.KernelPolicy` decides
(``use_fused_ops``). Opt-in until timed on a GPU: ``fused_ops`` on CUDA (on CPU with ``kernels="triton"`` under
``TRITON_INTERPRET=1``, how the tests run them); otherwise the reference. Inputs the kernels do not cover take the
reference too.

Checks: the kernels are held against the reference under Triton's CPU interpreter (tests/test_fused_kernels.py) and
compiled for sm_80 and sm_90 without a GPU (``python -m bench.perf.compile_check``); ``python -m bench.perf.kernels``
times them on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_mem.kernels._common import HAS_TRITON, SUPPORTED_DTYPES, interpreted, interpreting
from lora_mem.kernels.policy import KernelPolicy

from lora_mem.kernels._common import tl, triton

__all__ = ["swiglu", "swiglu_reference", "swiglu_triton", "SwiGLUFunction"]


# ---------------------------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------------------------


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up``: what model/qwen2.py's MLP computes without the kernel."""
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------------

@triton.jit
def _swiglu_fwd_kernel(
    g_ptr,  # gate (n_elements), contiguous
    u_ptr,  # up (n_elements), contiguous
    y_ptr,  # out (n_elements), contiguous
    n_elements,  # total number of elements
    BLOCK: tl.constexpr,  # elements per program
):
    """y = g / (1 + exp(-g)) * u in fp32 (torch's silu formula), one rounding to the output dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dy_ptr,  # upstream gradient (n_elements), contiguous
    g_ptr,  # gate from the forward
    u_ptr,  # up from the forward
    dg_ptr,  # out: gradient of gate
    du_ptr,  # out: gradient of up
    n_elements,  # total number of elements
    BLOCK: tl.constexpr,  # elements per program
):
    """du = dy silu(g);  dg = dy u sigmoid(g) (1 + g (1 - sigmoid(g))), fp32 math."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    tl.store(du_ptr + offs, (dy * g * sig).to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------------

_BLOCK = 1024  # GPU: 1024 elements, 4 warps (8 fp32 values a thread per tensor)
_INTERPRET_BLOCK = 256  # smaller under the interpreter, so test-sized tensors span several programs and a ragged tail


def _launch(kernel, n: int, *args) -> None:
    interpret = interpreting()
    block = _INTERPRET_BLOCK if interpret else _BLOCK
    (interpreted(kernel) if interpret else kernel)[(triton.cdiv(n, block),)](*args, n, BLOCK=block, num_warps=4)


# ---------------------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------------------


class SwiGLUFunction(torch.autograd.Function):
    r"""y = silu(g) * u, elementwise.

    With sigma = sigmoid(g) and silu(g) = g sigma: d silu / dg = sigma + g sigma (1 - sigma) = sigma (1 + g (1 - sigma))

    * du = dy silu(g) = dy g sigma
    * dg = dy u sigma (1 + g (1 - sigma))

    Saved: g and u (the inputs themselves, no copies); sigma is recomputed in backward, y is not kept.
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        g, u = gate.contiguous(), up.contiguous()  # no-ops for the model's projections
        y = torch.empty_like(g, memory_format=torch.contiguous_format)
        if g.numel():
            _launch(_swiglu_fwd_kernel, g.numel(), g, u, y)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        g, u = ctx.saved_tensors
        dy = dy.contiguous()  # an expanded gradient (from .sum()) becomes a real tensor here
        dg = torch.empty_like(g, memory_format=torch.contiguous_format)
        du = torch.empty_like(u, memory_format=torch.contiguous_format)
        if g.numel():
            _launch(_swiglu_bwd_kernel, g.numel(), dy, g, u, dg, du)
        need_g, need_u = ctx.needs_input_grad
        return (dg if need_g else None), (du if need_u else None)


# ---------------------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------------------


def triton_supports(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether the kernels cover these inputs; the dispatcher's second condition."""
    return (gate.shape == up.shape and gate.dtype == up.dtype and gate.dtype in SUPPORTED_DTYPES
            and gate.device == up.device)


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The fused kernels, always (CUDA, or CPU under ``TRITON_INTERPRET=1``). Same contract as the reference, for
    gate and up of one shape and dtype."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use swiglu() to fall back to the reference")
    if not triton_supports(gate, up):
        raise ValueError(f"SwiGLU kernel: gate {tuple(gate.shape)} {gate.dtype} on {gate.device}, up "
                         f"{tuple(up.shape)} {up.dtype} on {up.device}: need one shape, one device and one dtype "
                         f"out of {SUPPORTED_DTYPES}")
    return SwiGLUFunction.apply(gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor, policy: KernelPolicy = KernelPolicy()) -> torch.Tensor:
    """``silu(gate) * up``: the kernels where ``policy.use_fused_ops(gate)`` says so and they cover the inputs, else
    :func:`swiglu_reference` (the CPU default)."""
    if policy.use_fused_ops(gate) and triton_supports(gate, up):
        return swiglu_triton(gate, up)
    return swiglu_reference(gate, up)
