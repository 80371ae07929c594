"""RMSNorm: the PyTorch reference (what :class:`lora_mem.model.qwen2.RMSNorm` computes) and a fused Triton forward/backward.

    n = x * rsqrt(mean(x^2) + eps)   in fp32, per row of the last dimension
    y = w * n.to(x.dtype)            the normalised row is cast back to x's dtype before the weight (Hugging Face's
                                     order, bit-for-bit in bf16); y has the promoted dtype of w and x

Kernels (one program per row in forward; a block of rows per program in backward):

* ``_rms_norm_fwd_kernel``  reads a row of x once, writes y and the row's 1/rms (fp32, saved for backward: 4 bytes a
  row instead of re-reducing x).
* ``_rms_norm_bwd_kernel``  dx per row; dW partials summed over the program's rows in fp32 registers and written once
  per program (programs x N fp32), then summed by torch (deterministic, no atomics).

Saved for backward: x (a view of the input, no copy) and 1/rms. Never y or n.

Dispatch (:func:`rms_norm`): the caller's :class:`lora_mem.kernels.policy.KernelPolicy` decides
(``use_fused_ops``). Opt-in until timed on a GPU: ``fused_ops`` on CUDA (on CPU with ``kernels="triton"`` under
``TRITON_INTERPRET=1``, how the tests run them); otherwise the reference, whose backward is written out
(:class:`RMSNormNarrowBackward`) for 16-bit inputs that need a gradient. Inputs the kernels do not cover take the
reference too.

Checks: the kernels are held against the reference under Triton's CPU interpreter (tests/test_fused_kernels.py) and
compiled for sm_80 and sm_90 without a GPU (``python -m bench.perf.compile_check``); ``python -m bench.perf.kernels``
times them on a GPU.
"""

from __future__ import annotations

import torch

from lora_mem.kernels._common import HAS_TRITON, SUPPORTED_DTYPES, interpreted, interpreting, target_limits
from lora_mem.kernels.policy import KernelPolicy

from lora_mem.kernels._common import tl, triton

__all__ = ["rms_norm", "rms_norm_reference", "rms_norm_triton", "RMSNormFunction", "RMSNormNarrowBackward",
           "MAX_HIDDEN"]

MAX_HIDDEN = 8192  # one row fits one block (registers); larger rows take the reference. Wider rows spill: the
# backward holds about seven row-wide fp32 values per thread (bench/perf/compile_check.py compiles this width)


# ---------------------------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``, normalised in fp32: model/qwen2.py's RMSNorm.

    ``x.to(promote_types(x.dtype, float32))`` is ``x.float()`` for every model dtype (fp32, bf16, fp16: the same
    tensor operations, bit for bit) and keeps float64 in float64, so gradcheck can run on this function.
    """
    dtype = x.dtype
    x = x.to(torch.promote_types(dtype, torch.float32))
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class RMSNormNarrowBackward(torch.autograd.Function):
    """:func:`rms_norm_reference` with its backward written out (the formula of :class:`RMSNormFunction`), for
    16-bit x on a device without the kernels: the CPU bf16 training path. The forward is the reference's, bit for
    bit; the gradient is the same math in fp32 from x and 1/rms alone, where autograd's chain of the reference keeps
    and walks several fp32 (M, N) temporaries."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * xf.mul_(rstd).to(x.dtype)  # in place in x's fp32 copy: one (M, N) buffer fewer

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        n = x.float().mul_(rstd)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dn = dy.float().mul_(weight)
            dx = torch.addcmul(dn, n, (dn * n).mean(-1, keepdim=True), value=-1).mul_(rstd).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = (dy.float() * n.to(x.dtype)).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, None


# ---------------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------------

@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,  # X (M, N) input rows, any strides
    w_ptr,  # weight (N)
    y_ptr,  # Y (M, N) output, contiguous, in the promoted dtype of x and w
    rstd_ptr,  # (M) fp32: 1 / sqrt(mean(x^2) + eps) per row, saved for backward
    N,  # row length (hidden size)
    stride_xm, stride_xn,  # strides of X
    stride_w,  # stride of the weight
    stride_ym,  # row stride of Y (column stride 1)
    eps,  # added to the mean square
    BLOCK_N: tl.constexpr,  # next power of two >= N: the whole row in one block
):
    """One row per program: y = w * (x * rstd).to(x.dtype), rstd = rsqrt(sum(x^2) / N + eps), fp32 math."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N

    x = tl.load(x_ptr + row * stride_xm + cols * stride_xn, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols * stride_w, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)  # masked lanes are 0 and add nothing
    tl.store(rstd_ptr + row, rstd)

    n = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # the reference's cast back to x's dtype
    tl.store(y_ptr + row * stride_ym + cols, (w * n).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,  # dY (M, N) upstream gradient, any strides
    x_ptr,  # X (M, N) the forward input, any strides
    w_ptr,  # weight (N)
    rstd_ptr,  # (M) fp32 from the forward
    dx_ptr,  # dX (M, N) output, contiguous, x's dtype; unused unless HAS_DX
    dw_ptr,  # dW partials (programs, N) fp32, one row per program; unused unless HAS_DW
    M, N,  # rows, row length
    ROWS_PER_PROGRAM,  # rows handled by one program (the last program may get fewer)
    stride_dym, stride_dyn,  # strides of dY
    stride_xm, stride_xn,  # strides of X
    stride_w,  # stride of the weight
    stride_dxm,  # row stride of dX (column stride 1)
    stride_dwp,  # row stride of the dW partials
    HAS_DX: tl.constexpr,  # compute dX
    HAS_DW: tl.constexpr,  # compute dW
    BLOCK_N: tl.constexpr,  # next power of two >= N
):
    """dX = rstd * (dn - n * mean(dn * n)) with dn = dy * w, n = x * rstd;  dW partial = sum_rows dy * n_cast.

    A program walks ROWS_PER_PROGRAM consecutive rows, keeping its dW partial in fp32 registers.
    """
    pid = tl.program_id(0)
    row_start = pid * ROWS_PER_PROGRAM
    row_end = tl.minimum(row_start + ROWS_PER_PROGRAM, M)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N

    w = tl.load(w_ptr + cols * stride_w, mask=mask, other=0.0).to(tl.float32)
    first = row_start.to(tl.int64)  # int64 row offsets: M * N can pass 2^31
    dy_ptrs = dy_ptr + first * stride_dym + cols * stride_dyn
    x_ptrs = x_ptr + first * stride_xm + cols * stride_xn
    dx_ptrs = dx_ptr + first * stride_dxm + cols
    rstd_ptrs = rstd_ptr + first
    dw = tl.full((BLOCK_N,), 0.0, dtype=tl.float32)
    for _ in range(row_start, row_end):
        dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptrs)
        n = x * rstd
        if HAS_DX:
            dn = dy * w
            dx = rstd * (dn - n * (tl.sum(dn * n, axis=0) / N))
            tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_DW:
            dw += dy * n.to(x_ptr.dtype.element_ty).to(tl.float32)  # the weight multiplied the cast n
        dy_ptrs += stride_dym
        x_ptrs += stride_xm
        dx_ptrs += stride_dxm
        rstd_ptrs += 1
    if HAS_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * stride_dwp + cols, dw, mask=mask)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------------

_INTERPRET_PROGRAMS = 3  # backward programs under the interpreter: few, so test shapes give each several rows


def _num_warps(block: int) -> int:
    """Warps for a row of ``block`` elements (Liger-Kernel's calculate_settings): 4 up to 2K, then 8, 16, 32."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def _kernel(kernel):
    """The kernel to launch; under the interpreter its interpreted version.

    These kernels call ``tl.sum`` (a ``@triton.jit`` function of triton's standard library), which only runs in the
    interpreter when triton itself was imported with ``TRITON_INTERPRET=1`` already set (tests/conftest.py does so).
    """
    if not interpreting():
        return kernel
    interpreted_kernel = interpreted(kernel)
    if interpreted_kernel is not kernel:
        raise RuntimeError("the RMSNorm kernels run in Triton's interpreter only when TRITON_INTERPRET=1 is set "
                           "before triton is first imported")
    return interpreted_kernel


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (M, N); a view whenever reshape allows (any strides are passed to the kernels)."""
    return t.reshape(-1, t.shape[-1])


def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (M, N) contiguous in the promoted dtype, rstd (M) fp32) for rows x (M, N)."""
    M, N = x.shape
    y = torch.empty((M, N), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return y, rstd
    block = triton.next_power_of_2(N)
    _kernel(_rms_norm_fwd_kernel)[(M,)](
        x, weight, y, rstd,
        N,
        x.stride(0), x.stride(1),
        weight.stride(0),
        y.stride(0),
        float(eps),
        BLOCK_N=block, num_warps=_num_warps(block),
    )
    return y, rstd


def _rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, need_dx: bool, need_dw: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dX (M, N) in x's dtype or None, dW (N) in the weight's dtype or None)."""
    M, N = x.shape
    if M == 0:
        return (torch.zeros_like(x) if need_dx else None), (torch.zeros_like(weight) if need_dw else None)
    if interpreting():
        programs = min(M, _INTERPRET_PROGRAMS)
    else:  # about two programs per SM: each keeps one dW partial row, so fewer programs = less to sum afterwards
        programs = min(M, 2 * target_limits()[2])
    rows_per_program = triton.cdiv(M, programs)
    programs = triton.cdiv(M, rows_per_program)

    dx = torch.empty((M, N), dtype=x.dtype, device=x.device) if need_dx else x  # x: dummy pointer, never written
    dw_partial = torch.empty((programs, N), dtype=torch.float32, device=x.device) if need_dw else rstd  # likewise
    block = triton.next_power_of_2(N)
    _kernel(_rms_norm_bwd_kernel)[(programs,)](
        dy, x, weight, rstd, dx, dw_partial,
        M, N, rows_per_program,
        dy.stride(0), dy.stride(1),
        x.stride(0), x.stride(1),
        weight.stride(0),
        dx.stride(0),
        dw_partial.stride(0),
        HAS_DX=need_dx, HAS_DW=need_dw,
        BLOCK_N=block, num_warps=_num_warps(block),
    )
    return (dx if need_dx else None), (dw_partial.sum(dim=0).to(weight.dtype) if need_dw else None)


# ---------------------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------------------


class RMSNormFunction(torch.autograd.Function):
    r"""Fused RMSNorm over the last dimension.

    Forward, per row x of length N (fp32 math): r = (mean(x^2) + eps)^{-1/2}, n = x r, y = w * cast(n), where cast
    rounds to x's dtype (the identity in fp32).

    Backward, given dy (the cast passes gradients through unchanged, as autograd's ``.to`` does):

    * dW:  y_j = w_j cast(n_j), so dL/dw_j = sum over rows of dy_j cast(n_j)                (N), summed over rows
    * dn:  dL/dn_j = dy_j w_j
    * dX:  n_j = x_j r and dr/dx_k = -r^3 x_k / N, so
           dL/dx_k = dn_k r + sum_j dn_j x_j (-r^3 x_k / N) = r (dn_k - n_k mean_j(dn_j n_j))

    Saved: x (a view) and r (M fp32); n is recomputed from them.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = _rows(x)  # (M, N)
        y, rstd = _rms_norm_forward(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[:2]
        dx, dw = _rms_norm_backward(_rows(dy), x2, weight, rstd, need_dx, need_dw)
        return (dx.view(ctx.x_shape) if dx is not None else None), dw, None


# ---------------------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------------------


def triton_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernels cover these inputs (dtype, device, row length); the dispatcher's second condition."""
    return (x.dtype in SUPPORTED_DTYPES and weight.dtype in SUPPORTED_DTYPES and weight.device == x.device
            and weight.dim() == 1 and weight.shape[0] == x.shape[-1] and 0 < x.shape[-1] <= MAX_HIDDEN)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The fused kernels, always (CUDA, or CPU under ``TRITON_INTERPRET=1``). Same contract as the reference."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use rms_norm() to fall back to the reference")
    if not triton_supports(x, weight):
        raise ValueError(f"RMSNorm kernel: x {tuple(x.shape)} {x.dtype} on {x.device}, weight {tuple(weight.shape)} "
                         f"{weight.dtype} on {weight.device}: need matching sizes <= {MAX_HIDDEN}, one device, "
                         f"dtypes {SUPPORTED_DTYPES}")
    return RMSNormFunction.apply(x, weight, float(eps))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, policy: KernelPolicy = KernelPolicy()) -> torch.Tensor:
    """RMSNorm of the last dimension: the kernels where ``policy.use_fused_ops(x)`` says so and they cover the inputs,
    else :func:`rms_norm_reference` (the CPU default), with its backward written out for 16-bit x that needs a
    gradient (:class:`RMSNormNarrowBackward`, the same forward)."""
    if policy.use_fused_ops(x) and triton_supports(x, weight):
        return rms_norm_triton(x, weight, eps)
    if x.element_size() < 4 and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return RMSNormNarrowBackward.apply(x, weight, float(eps))
    return rms_norm_reference(x, weight, eps)
