"""Rotary position embedding of q and k: the PyTorch reference (model/qwen2.py's ``apply_rotary``, the rotate-half
convention of Hugging Face checkpoints) and a fused Triton forward/backward that rotates q and k in one launch.

    out = x * cos + rotate_half(x) * sin,   rotate_half([x1 | x2]) = [-x2 | x1]   (halves of the head dimension)
    i.e. out1 = x1 cos1 - x2 sin1,  out2 = x2 cos2 + x1 sin2

x: (B, H, T, D) (q) or (B, Hkv, T, D) (k), any strides (the model's are transposed views of (B, T, H, D));
cos, sin: (B, T, D), (1, T, D) or (T, D), broadcast over heads. The kernel reads both halves of cos and sin, so it
does not rely on the two halves being equal (they are for RotaryEmbedding's tables).

Kernel: ``_rope_kernel``, one program per token (b, t): loads that token's cos/sin row once, then all q heads as one
(H, D/2) tile pair and all k heads as one (Hkv, D/2) tile pair, and writes the rotated heads to new tensors laid out
(B, T, H, D) (returned as (B, H, T, D) views, the layout q_proj(x).view(...).transpose(1, 2) has). Never in place.
Backward is the transposed rotation (the same kernel with BACKWARD=True); cos and sin get no gradient.

Dispatch (:func:`apply_rotary_qk`): the caller's :class:`lora_mem.kernels.policy.KernelPolicy` decides
(``use_fused_ops``). Opt-in until timed on a GPU: ``fused_ops`` on CUDA (on CPU with ``kernels="triton"`` under
``TRITON_INTERPRET=1``, how the tests run them); otherwise the reference. Inputs the kernels do not cover take the
reference too.

Checks: the kernels are held against the reference under Triton's CPU interpreter (tests/test_fused_kernels.py) and
compiled for sm_80 and sm_90 without a GPU (``python -m bench.perf.compile_check``); ``python -m bench.perf.kernels``
times them on a GPU.
"""

from __future__ import annotations

import torch

from lora_mem.kernels._common import HAS_TRITON, SUPPORTED_DTYPES, interpreted, interpreting
from lora_mem.kernels.policy import KernelPolicy

from lora_mem.kernels._common import tl, triton

__all__ = ["rotate_half", "apply_rotary", "apply_rotary_qk", "apply_rotary_qk_reference", "apply_rotary_qk_triton",
           "RotaryFunction"]


# ---------------------------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); cos/sin: (B, T, D) broadcast over heads
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def apply_rotary_qk_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k rotated by :func:`apply_rotary`: what model/qwen2.py's attention computes without the kernel."""
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


# ---------------------------------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------------------------------

@triton.jit
def _rope_kernel(
    q_ptr,  # Q (B, H, T, D): q in forward, dq_out in backward; any strides
    k_ptr,  # K (B, Hkv, T, D): k in forward, dk_out in backward; any strides
    cos_ptr,  # cos (B, T, D), broadcast dimensions with stride 0
    sin_ptr,  # sin (B, T, D), likewise
    q_out_ptr,  # rotated Q, (B, H, T, D) with the strides of a contiguous (B, T, H, D) tensor
    k_out_ptr,  # rotated K, likewise
    T,  # tokens per sequence (programs are b * T + t)
    H, HKV,  # query heads, key/value heads
    D_HALF,  # head_dim / 2
    stride_qb, stride_qh, stride_qt, stride_qd,  # strides of Q
    stride_kb, stride_kh, stride_kt, stride_kd,  # strides of K
    stride_cb, stride_ct, stride_cd,  # strides of cos
    stride_sb, stride_st, stride_sd,  # strides of sin
    stride_qob, stride_qoh, stride_qot,  # strides of the Q output (head_dim stride 1)
    stride_kob, stride_koh, stride_kot,  # strides of the K output (head_dim stride 1)
    BACKWARD: tl.constexpr,  # apply the transposed rotation (the gradient)
    BLOCK_H: tl.constexpr,  # next power of two >= H
    BLOCK_HKV: tl.constexpr,  # next power of two >= Hkv
    BLOCK_D: tl.constexpr,  # next power of two >= D / 2
):
    """Forward:  o1 = x1 c1 - x2 s1,  o2 = x2 c2 + x1 s2   (fp32 math, one rounding to the output dtype).
    Backward: the transpose, dx1 = do1 c1 + do2 s2,  dx2 = do2 c2 - do1 s1."""
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D_HALF

    # This token's cos/sin, both halves.
    c_row = cos_ptr + b * stride_cb + t * stride_ct
    s_row = sin_ptr + b * stride_sb + t * stride_st
    c1 = tl.load(c_row + d * stride_cd, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(c_row + (d + D_HALF) * stride_cd, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(s_row + d * stride_sd, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(s_row + (d + D_HALF) * stride_sd, mask=d_mask, other=0.0).to(tl.float32)[None, :]

    # --- q: all H heads of this token as two (BLOCK_H, BLOCK_D) halves ------------------------------------------
    h = tl.arange(0, BLOCK_H)
    mask = (h < H)[:, None] & d_mask[None, :]
    h = h.to(tl.int64)  # head offsets in int64: H * stride_qh passes 2^31 for long contiguous (B, H, T, D) grads
    src = q_ptr + b * stride_qb + t * stride_qt + h[:, None] * stride_qh + d[None, :] * stride_qd
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + D_HALF * stride_qd, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    dst = q_out_ptr + b * stride_qob + t * stride_qot + h[:, None] * stride_qoh + d[None, :]
    tl.store(dst, o1.to(q_out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + D_HALF, o2.to(q_out_ptr.dtype.element_ty), mask=mask)

    # --- k: all Hkv heads, the same rotation --------------------------------------------------------------------
    hk = tl.arange(0, BLOCK_HKV)
    mask_k = (hk < HKV)[:, None] & d_mask[None, :]
    hk = hk.to(tl.int64)
    src_k = k_ptr + b * stride_kb + t * stride_kt + hk[:, None] * stride_kh + d[None, :] * stride_kd
    y1 = tl.load(src_k, mask=mask_k, other=0.0).to(tl.float32)
    y2 = tl.load(src_k + D_HALF * stride_kd, mask=mask_k, other=0.0).to(tl.float32)
    if BACKWARD:
        p1 = y1 * c1 + y2 * s2
        p2 = y2 * c2 - y1 * s1
    else:
        p1 = y1 * c1 - y2 * s1
        p2 = y2 * c2 + y1 * s2
    dst_k = k_out_ptr + b * stride_kob + t * stride_kot + hk[:, None] * stride_koh + d[None, :]
    tl.store(dst_k, p1.to(k_out_ptr.dtype.element_ty), mask=mask_k)
    tl.store(dst_k + D_HALF, p2.to(k_out_ptr.dtype.element_ty), mask=mask_k)


# ---------------------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------------------


def _table(t: torch.Tensor, B: int, T: int, D: int) -> torch.Tensor:
    """cos or sin as a (B, T, D) view: (T, D) and (1, T, D) broadcast with stride 0, no copy."""
    if t.dim() == 2:
        t = t.unsqueeze(0)
    return t.expand(B, T, D)


def _empty_bthd_as_bhtd(x: torch.Tensor) -> torch.Tensor:
    """A new (B, H, T, D) tensor stored as (B, T, H, D): the layout of the model's transposed projections."""
    B, H, T, D = x.shape
    return torch.empty((B, T, H, D), dtype=x.dtype, device=x.device).transpose(1, 2)


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate (or, backward, rotate back) q (B, H, T, D) and k (B, Hkv, T, D) into new tensors."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    q_out, k_out = _empty_bthd_as_bhtd(q), _empty_bthd_as_bhtd(k)
    if B * T == 0:
        return q_out, k_out
    block_h, block_hkv, block_d = (triton.next_power_of_2(n) for n in (H, Hkv, D // 2))
    kernel = interpreted(_rope_kernel) if interpreting() else _rope_kernel
    kernel[(B * T,)](
        q, k, cos, sin, q_out, k_out,
        T, H, Hkv, D // 2,
        *q.stride(), *k.stride(), *cos.stride(), *sin.stride(),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        BACKWARD=backward, BLOCK_H=block_h, BLOCK_HKV=block_hkv, BLOCK_D=block_d,
        num_warps=4 if max(block_h, block_hkv) * block_d <= 2048 else 8,
    )
    return q_out, k_out


# ---------------------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------------------


class RotaryFunction(torch.autograd.Function):
    r"""Rotary embedding of q and k, one launch each way.

    Per token and head, with the halves x = [x1 | x2] and the token's cos = [c1 | c2], sin = [s1 | s2]:

        o1 = x1 c1 - x2 s1,   o2 = x2 c2 + x1 s2       (o = x cos + rotate_half(x) sin)

    o is linear in x, o = R x with R = [[diag(c1), -diag(s1)], [diag(s2), diag(c2)]], so dx = R^T do:

        dx1 = do1 c1 + do2 s2,   dx2 = do2 c2 - do1 s1

    Saved: cos and sin only (the rotation does not depend on x). cos/sin are treated as constants (the model's tables
    are computed from positions and a buffer, nothing trainable); the dispatcher sends cos/sin that require grad to
    the reference.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, _, T, D = q.shape
        cos, sin = _table(cos, B, T, D), _table(sin, B, T, D)
        ctx.save_for_backward(cos, sin)
        return _rope(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dq_in, dk_in = _rope(dq, dk, cos, sin, backward=True)  # unused outputs arrive as zeros (materialized)
        need_q, need_k = ctx.needs_input_grad[:2]
        return (dq_in if need_q else None), (dk_in if need_k else None), None, None


# ---------------------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------------------


def triton_supports(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the kernel covers these inputs; the dispatcher's second condition."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() not in (2, 3) or cos.shape != sin.shape:
        return False
    B, _, T, D = q.shape
    if k.shape[0] != B or k.shape[2:] != (T, D) or D % 2 or cos.shape[-2:] != (T, D):
        return False
    if cos.dim() == 3 and cos.shape[0] not in (1, B):
        return False
    tensors = (q, k, cos, sin)
    return (all(t.dtype == q.dtype for t in tensors) and q.dtype in SUPPORTED_DTYPES
            and all(t.device == q.device for t in tensors) and not (cos.requires_grad or sin.requires_grad))


def apply_rotary_qk_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel, always (CUDA, or CPU under ``TRITON_INTERPRET=1``). Same contract as the reference."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use apply_rotary_qk() to fall back to the reference")
    if not triton_supports(q, k, cos, sin):
        raise ValueError(f"rotary kernel: q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, cos "
                         f"{tuple(cos.shape)} {cos.dtype}, sin {tuple(sin.shape)}: need q (B, H, T, D), k (B, Hkv, T, "
                         f"D), cos/sin (B or 1, T, D) without grad, even D, one dtype out of {SUPPORTED_DTYPES}")
    return RotaryFunction.apply(q, k, cos, sin)


def apply_rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    policy: KernelPolicy = KernelPolicy()) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) rotated: the kernel where ``policy.use_fused_ops(q)`` says so and it covers the inputs, else
    :func:`apply_rotary_qk_reference` (the CPU default)."""
    if policy.use_fused_ops(q) and triton_supports(q, k, cos, sin):
        return apply_rotary_qk_triton(q, k, cos, sin)
    return apply_rotary_qk_reference(q, k, cos, sin)
