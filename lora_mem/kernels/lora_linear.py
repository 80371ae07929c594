"""Fused LoRA linear in Triton: the low-rank update rides inside the base GEMM, forward and backward.

    y = x W^T + b + s * (dropout(x) A^T) B^T        x: (M, K)  W: (N, K)  b: (N)  A: (r, K)  B: (N, r)

Forward, two launches:
  1. ``_thin_matmul_kernel``        u = s dropout(x) A^T                    (M, r)   the thin LoRA activation
  2. ``_fused_lora_matmul_kernel``  y = [x | u] @ [W | B]^T + b              (M, N)
     i.e. the K-loop of x W^T runs as usual, then one more reduction step of width r adds u B^T into the same fp32
     accumulator; y is written once and never re-read (PEFT writes x W^T, reads it back to add the LoRA term).

Backward (W and b frozen; derivation in :class:`LoRALinearFunction`), four launches:
  dt = s dY B        thin      (M, r)
  dB = dY^T u        thin, reduction over M split across programs (fp32 partials summed by torch)
  dA = dt^T x_drop   thin, likewise, written straight into A's (r, K) layout
  dX = dY W + (dt A) * keep / (1 - p)    fused GEMM, same trick as the forward (with dropout the masked LoRA term
                                          is formed first and starts the accumulator)

Saved for backward: x (a view of the input, no copy), the thin s t (M x r), and with dropout the uint8 keep-mask.
Never y.

Dispatch (:func:`lora_linear`): the caller's :class:`lora_mem.kernels.policy.KernelPolicy` decides (by default CUDA
tensors take the kernels, CPU tensors the PyTorch reference, :mod:`lora_mem.kernels.lora_reference`; its ``triton``
mode runs the kernels on CPU through Triton's interpreter under ``TRITON_INTERPRET=1``, how the tests cover them).
Without triton installed this module still imports and uses the reference.
"""

from __future__ import annotations

import torch

from lora_mem.kernels._common import (
    ACC_BYTES,
    FUSED_CONFIGS,
    HAS_TRITON,
    INTERPRET_FUSED_CONFIG,
    MAX_RANK,
    SM80_MAX_ACC_PER_THREAD,
    SUPPORTED_DTYPES,
    acc_per_thread,
    config_pool,
    dot_flags,
    interpreted,
    interpreting,
    next_pow2,
    pipeline_smem,
    rank_block,
    target_limits,
    uses_tensor_cores,
)
from lora_mem.kernels.lora_reference import dropout_keep_mask, dropout_keep_scale, lora_linear_reference
from lora_mem.kernels.policy import KernelPolicy

from lora_mem.kernels._common import tl, triton

__all__ = ["HAS_TRITON", "lora_linear", "lora_linear_triton", "LoRALinearFunction",
           "MAX_RANK"]


# ---------------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------------

@triton.jit
def _thin_matmul_kernel(
    x_ptr,  # X (P, Q): the wide operand; x, dY, or a transposed view of either (any strides)
    keep_ptr,  # dropout keep-mask (P, Q) uint8 applied to X; unused unless HAS_KEEP
    y_ptr,  # Y (Q, R): the thin operand; A^T, B, t or dt (any strides)
    out_ptr,  # out (SPLITS, P, R): one slab per reduction split (fp32 partials), or the result when SPLITS == 1
    P,  # rows of X and of out
    Q,  # reduction length
    R,  # columns of out: the LoRA rank, <= BLOCK_R
    Q_PER_SPLIT,  # length of the Q range one program reduces; program_id(1) picks the range
    stride_xp, stride_xq,  # strides of X
    stride_kp, stride_kq,  # strides of the keep-mask
    stride_yq, stride_yr,  # strides of Y
    stride_os, stride_op, stride_or,  # strides of out (split, row, rank)
    scale,  # multiplies the fp32 result: s / (1 - p) for s t, s for dt, 1 / (1 - p) for dA, 1 for dB
    P_BUCKET, Q_BUCKET,  # next powers of two of P and Q: autotune keys only, so nearby sizes share a config
    HAS_KEEP: tl.constexpr,  # dropped elements of X (keep == 0) read as zero (dropout on the LoRA input)
    DOT_FP32: tl.constexpr,  # upcast operands to fp32 before tl.dot (bf16 under the interpreter, see launcher)
    INPUT_PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands ("ieee" or "tf32")
    BLOCK_P: tl.constexpr,  # rows of out per program
    BLOCK_Q: tl.constexpr,  # reduction step
    BLOCK_R: tl.constexpr,  # the rank padded to a power of two >= 16 (tl.dot needs >= 16 per dimension)
):
    """out[split, P, R] = scale * (X * keep)[P, Q-range] @ Y[Q-range, R], fp32 accumulation.

    Dropout's 1 / (1 - p) is part of ``scale``, applied once to the fp32 sum: masking itself is exact, so the
    dropped input is never rounded.

    The output is only BLOCK_R (<= 128) wide, so each program owns a full row block of it and loops over Q. When
    P is small (dA: P = K, dB: P = N, with Q = M tokens) there would be too few programs to fill the GPU, so the
    launcher splits Q across program_id(1) and sums the fp32 partials afterwards (deterministic, unlike atomics).
    """
    pid_p = tl.program_id(0)
    pid_split = tl.program_id(1)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_r = tl.arange(0, BLOCK_R)
    p_mask = offs_p < P
    r_mask = offs_r < R  # pads the rank up to BLOCK_R with zeros

    q_start = pid_split * Q_PER_SPLIT
    q_end = tl.minimum(q_start + Q_PER_SPLIT, Q)

    # Row offsets in int64: P * stride can pass 2^31 for large token counts. Later steps move the pointers.
    x_ptrs = x_ptr + offs_p[:, None].to(tl.int64) * stride_xp + (q_start + offs_q)[None, :].to(tl.int64) * stride_xq
    keep_ptrs = (keep_ptr + offs_p[:, None].to(tl.int64) * stride_kp
                 + (q_start + offs_q)[None, :].to(tl.int64) * stride_kq)
    y_ptrs = y_ptr + (q_start + offs_q)[:, None].to(tl.int64) * stride_yq + offs_r[None, :] * stride_yr

    acc = tl.full((BLOCK_P, BLOCK_R), 0.0, dtype=tl.float32)
    for q0 in range(q_start, q_end, BLOCK_Q):
        q_mask = (q0 + offs_q) < q_end
        x_mask = p_mask[:, None] & q_mask[None, :]
        x = tl.load(x_ptrs, mask=x_mask, other=0.0)
        if HAS_KEEP:  # dropout: zero the dropped elements (masking x's load by keep would serialise the two)
            keep = tl.load(keep_ptrs, mask=x_mask, other=0)
            x = tl.where(keep != 0, x, 0.0)
        y = tl.load(y_ptrs, mask=q_mask[:, None] & r_mask[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, y, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_Q * stride_xq
        keep_ptrs += BLOCK_Q * stride_kq
        y_ptrs += BLOCK_Q * stride_yq

    acc = acc * scale
    out_ptrs = (out_ptr + pid_split * stride_os + offs_p[:, None].to(tl.int64) * stride_op
                + offs_r[None, :] * stride_or)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=p_mask[:, None] & r_mask[None, :])


@triton.jit
def _fused_lora_matmul_kernel(
    a_ptr,  # A (M, K): x in forward, dY in backward
    b_ptr,  # Bm (K, N): W^T in forward (a strided view of W), W in backward
    t_ptr,  # T (M, R): the thin LoRA operand; t in forward, dt in backward
    u_ptr,  # U (R, N): the LoRA up operand; B^T in forward, A in backward
    keep_ptr,  # dropout keep-mask (M, N) uint8 on the LoRA term (dX with dropout); unused unless HAS_KEEP
    bias_ptr,  # bias (N); unused unless HAS_BIAS
    out_ptr,  # out (M, N)
    M, N, K,  # problem sizes of the base GEMM
    R,  # the LoRA rank, <= BLOCK_R
    stride_am, stride_ak,  # strides of A
    stride_bk, stride_bn,  # strides of Bm
    stride_tm, stride_tr,  # strides of T
    stride_ur, stride_un,  # strides of U
    stride_km, stride_kn,  # strides of the keep-mask
    stride_om, stride_on,  # strides of out
    keep_scale,  # value of a kept element of the LoRA term: 1 / (1 - p); unused unless HAS_KEEP
    M_BUCKET,  # next power of two of M: autotune key only, so nearby token counts share a config
    HAS_BIAS: tl.constexpr,  # add bias[N] in the epilogue
    HAS_KEEP: tl.constexpr,  # the LoRA term is multiplied elementwise by keep * keep_scale
    DOT_FP32: tl.constexpr,  # upcast operands to fp32 before tl.dot (bf16 under the interpreter, see launcher)
    INPUT_PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands ("ieee" or "tf32")
    BLOCK_M: tl.constexpr,  # rows of out per program
    BLOCK_N: tl.constexpr,  # columns of out per program
    BLOCK_K: tl.constexpr,  # reduction step of the base GEMM
    BLOCK_R: tl.constexpr,  # the rank padded to a power of two >= 16
    GROUP_M: tl.constexpr,  # row blocks per group in the launch order (L2 reuse, as in the Triton matmul tutorial)
):
    """out = A @ Bm + (T @ U) * keep * keep_scale + bias, one fp32 accumulator, written once.

    The LoRA scaling s is already inside T (s t in forward, dt = s dY B in backward), so without dropout the LoRA
    term is just R more steps of the same reduction: [A | T] @ [Bm ; U].
    """
    # Grouped launch order: consecutive programs share row blocks of A and column blocks of Bm in L2.
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # The LoRA reduction (the rank, padded to BLOCK_R) runs in steps of at most BLOCK_K, as the base K-loop does:
    # one step of the whole rank holds rank-wide operand fragments at once, which spills at rank 128.
    R_STEP: tl.constexpr = BLOCK_K if BLOCK_K < BLOCK_R else BLOCK_R
    offs_r = tl.arange(0, R_STEP)
    t_ptrs = t_ptr + offs_m[:, None].to(tl.int64) * stride_tm + offs_r[None, :] * stride_tr
    u_ptrs = u_ptr + offs_r[:, None] * stride_ur + offs_n[None, :].to(tl.int64) * stride_un

    if HAS_KEEP:
        # Dropout acts elementwise on the (M, N) LoRA term, so it is not more steps of the base reduction: it is
        # formed first and starts the accumulator, so one BLOCK_M x BLOCK_N fp32 tile is live during the K-loop,
        # not two (large tiles spill with two).
        lora = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        for r0 in range(0, R, R_STEP):
            r_mask = offs_r < R - r0  # pads the rank up to the step with zeros
            t = tl.load(t_ptrs, mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            if DOT_FP32:
                lora = tl.dot(t.to(tl.float32), u.to(tl.float32), lora, input_precision="ieee")
            else:
                lora = tl.dot(t, u, lora, input_precision=INPUT_PRECISION)
            t_ptrs += R_STEP * stride_tr
            u_ptrs += R_STEP * stride_ur
        keep = tl.load(keep_ptr + offs_m[:, None].to(tl.int64) * stride_km + offs_n[None, :] * stride_kn,
                       mask=m_mask[:, None] & n_mask[None, :], other=0)
        acc = tl.where(keep != 0, lora * keep_scale, 0.0)
    else:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)

    # --- base GEMM: acc += A @ Bm -------------------------------------------------------------------------------
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        k_mask = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # --- LoRA term without dropout: more steps of the same reduction, over [T | U] -------------------------------
    if not HAS_KEEP:
        # Concatenated reduction: the LoRA product accumulates into the same registers as the base GEMM (no second
        # BLOCK_M x BLOCK_N fp32 tile, no write and re-read of out).
        for r0 in range(0, R, R_STEP):
            r_mask = offs_r < R - r0  # pads the rank up to the step with zeros
            t = tl.load(t_ptrs, mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            if DOT_FP32:
                acc = tl.dot(t.to(tl.float32), u.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(t, u, acc, input_precision=INPUT_PRECISION)
            t_ptrs += R_STEP * stride_tr
            u_ptrs += R_STEP * stride_ur

    # --- epilogue -----------------------------------------------------------------------------------------------
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# GPU configs, one pool per kind of tl.dot (see FUSED_CONFIGS in _common): tensor cores, and the FMA units (fp32 at
# full precision), where the tensor-core tiles would spill, so fp32 has smaller tiles with a 32-wide reduction step.
# The prune functions take the pool of the launch's dot, then drop what would not fit the GPU.
# bench/perf/compile_check.py compiles every pool for sm_80 and sm_90 and is the measure behind each limit below.
_FUSED_FP32_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=4),
]
_THIN_CONFIGS = [
    triton.Config({"BLOCK_P": 64, "BLOCK_Q": 64}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_P": 128, "BLOCK_Q": 64}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_P": 128, "BLOCK_Q": 64}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_P": 64, "BLOCK_Q": 128}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_P": 128, "BLOCK_Q": 128}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_P": 32, "BLOCK_Q": 128}, num_stages=4, num_warps=4),
]
_THIN_FP32_CONFIGS = [  # kept per rank by _FMA_MAX_OPERANDS_PER_THREAD
    triton.Config({"BLOCK_P": 32, "BLOCK_Q": 128}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_P": 128, "BLOCK_Q": 64}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_P": 64, "BLOCK_Q": 128}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_P": 32, "BLOCK_Q": 64}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_P": 64, "BLOCK_Q": 32}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_P": 32, "BLOCK_Q": 32}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_P": 16, "BLOCK_Q": 32}, num_stages=3, num_warps=4),
]
# With dropout at ranks from 64 the thin kernel's tensor-core tiles spill beside the keep-mask tile; these do not.
_THIN_KEEP_WIDE_RANK_CONFIGS = [
    triton.Config({"BLOCK_P": 32, "BLOCK_Q": 64}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_P": 16, "BLOCK_Q": 128}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_P": 16, "BLOCK_Q": 64}, num_stages=3, num_warps=4),
]
# The thin kernel on the FMA units holds its X, Y and output tiles in registers: configs with more elements of the
# three per thread than this spill (ranks 16 to 128, with and without dropout).
_FMA_MAX_OPERANDS_PER_THREAD = 52
# With dropout in the fused kernel, where the masked LoRA term is formed before the K-loop, the tensor-core tiles
# spill past this many bytes of accumulator per thread (ACC_BYTES in _common elsewhere).
_KEEP_ACC_BYTES = 128


def _fused_smem(c, elsize: int, block_r: int, has_keep: bool, tensor_cores: bool) -> int:
    bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
    lora = (bm + bn) * min(bk, block_r) * elsize if has_keep else 0  # the LoRA step's tiles, loaded before
    return pipeline_smem((bm + bn) * bk * elsize, c.num_stages, tensor_cores) + lora


def _thin_smem(c, elsize: int, block_r: int, has_keep: bool, tensor_cores: bool) -> int:
    bp, bq = c.kwargs["BLOCK_P"], c.kwargs["BLOCK_Q"]
    stage = (bp * bq + bq * block_r) * elsize + (bp * bq if has_keep else 0)  # + the uint8 keep-mask tile
    fma_keep = has_keep and not tensor_cores  # the FMA dot also converts the masked X tile through shared memory
    return pipeline_smem(stage, c.num_stages, tensor_cores) + (4 * bp * bq if fma_keep else 0)


def _prune_fused_configs(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem (few tokens, the 256-wide k/v projections): they only add masked
    work and compile time. Keeps at least one config."""
    m_cap = max(named_args["M_BUCKET"], 64)
    n_cap = max(triton.next_power_of_2(named_args["N"]), 64)
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= m_cap and c.kwargs["BLOCK_N"] <= n_cap]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _prune_thin_configs(configs, named_args, **kwargs):
    """As above for the thin kernel's row and reduction blocks."""
    p_cap = max(named_args["P_BUCKET"], 32)
    q_cap = max(named_args["Q_BUCKET"], 64)
    kept = [c for c in configs if c.kwargs["BLOCK_P"] <= p_cap and c.kwargs["BLOCK_Q"] <= q_cap]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_Q"])]


def _fused_configs_for_launch(configs, named_args, **kwargs):
    """The fused kernel's early_config_prune: the pool of the launch's dot, sized to the problem
    (:func:`_prune_fused_configs`), less what would not fit the GPU: over its shared memory (estimated), or more
    accumulator per thread than SM80_MAX_ACC_PER_THREAD on sm_80 or _KEEP_ACC_BYTES with dropout (those spill).
    Keeps at least one config; with one left the autotuner measures nothing."""
    a = named_args["a_ptr"]
    tensor_cores = uses_tensor_cores(a, kwargs["INPUT_PRECISION"])
    pool = config_pool(configs, _FUSED_FP32_CONFIGS, tensor_cores)
    arch, smem_limit, _ = target_limits()
    keep = kwargs["HAS_KEEP"]

    def smem(c):
        return _fused_smem(c, a.element_size(), kwargs["BLOCK_R"], keep, tensor_cores)

    def spills(c):
        acc = acc_per_thread(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)
        return (arch < 90 and acc > SM80_MAX_ACC_PER_THREAD) or (keep and acc * a.element_size() > _KEEP_ACC_BYTES)

    kept = [c for c in _prune_fused_configs(pool, named_args) if smem(c) <= smem_limit and not spills(c)]
    return kept or [min(pool, key=smem)]


def _thin_configs_for_launch(configs, named_args, **kwargs):
    """As above for the thin kernel, whose pools are three: tensor cores (at most ACC_BYTES of accumulator per
    thread), with dropout at ranks from 64 its own small tiles, and on the FMA units those with at most
    _FMA_MAX_OPERANDS_PER_THREAD elements of the X, Y and output tiles per thread."""
    x = named_args["x_ptr"]
    tensor_cores = uses_tensor_cores(x, kwargs["INPUT_PRECISION"])
    _, smem_limit, _ = target_limits()
    keep, block_r = kwargs["HAS_KEEP"], kwargs["BLOCK_R"]

    def smem(c):
        return _thin_smem(c, x.element_size(), block_r, keep, tensor_cores)

    def fma_operands(c):
        bp, bq = c.kwargs["BLOCK_P"], c.kwargs["BLOCK_Q"]
        return (bp * bq + bq * block_r + bp * block_r) / (32 * c.num_warps)

    if not tensor_cores:
        fp32 = [c for c in configs if c in _THIN_FP32_CONFIGS]
        pool = [c for c in fp32 if fma_operands(c) <= _FMA_MAX_OPERANDS_PER_THREAD] or fp32
    elif keep and block_r >= 64:
        pool = [c for c in configs if c in _THIN_KEEP_WIDE_RANK_CONFIGS]
    else:
        tiles = [c for c in configs if c in _THIN_CONFIGS]
        pool = [c for c in tiles if acc_per_thread(c.kwargs["BLOCK_P"], block_r, c.num_warps) * x.element_size()
                <= ACC_BYTES] or tiles
    kept = [c for c in _prune_thin_configs(pool, named_args) if smem(c) <= smem_limit]
    return kept or [min(pool, key=smem)]


# Layout strides are in the keys because the same kernel reads its operands row-major or transposed (fused: W^T in
# forward, W for dX, which have the same sizes for square layers; thin: x/dY for t, dt, their transposes for dA,
# dB), and those want different tiles. BLOCK_R: the rank changes the tiles' register and shared-memory footprint;
# INPUT_PRECISION: fp32 in TF32 takes the other pool. cache_results: the chosen config of a key is stored beside
# the compiled binaries in Triton's cache directory (TRITON_CACHE_DIR, default ~/.triton/cache), so a process
# that finds it there neither benchmarks the configs again nor compiles the ones it does not use.
_fused_lora_matmul_autotuned = triton.autotune(
    configs=FUSED_CONFIGS + _FUSED_FP32_CONFIGS,
    key=["M_BUCKET", "N", "K", "BLOCK_R", "HAS_KEEP", "stride_bk", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _fused_configs_for_launch}, cache_results=True,
)(_fused_lora_matmul_kernel)
_thin_matmul_autotuned = triton.autotune(
    configs=_THIN_CONFIGS + _THIN_KEEP_WIDE_RANK_CONFIGS + _THIN_FP32_CONFIGS,
    key=["P_BUCKET", "Q_BUCKET", "BLOCK_R", "stride_xq", "HAS_KEEP", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _thin_configs_for_launch}, cache_results=True,
)(_thin_matmul_kernel)

# Under the interpreter autotuning measures nothing, so one small fixed config (INTERPRET_FUSED_CONFIG in _common).
_INTERPRET_THIN_CONFIG = {"BLOCK_P": 16, "BLOCK_Q": 16}
_INTERPRET_Q_PER_SPLIT = 32  # small, so test shapes exercise the split reduction


# ---------------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------------


def _q_per_split(P: int, Q: int, device: torch.device, interpret: bool) -> int:
    """How much of the reduction one program of the thin kernel takes.

    Enough splits that (row blocks x splits) covers the GPU about twice, with at least 512 reduction steps per split
    and a multiple of 256 (so every BLOCK_Q candidate divides it).
    """
    if interpret:
        return _INTERPRET_Q_PER_SPLIT
    _, _, sms = target_limits()
    row_blocks = triton.cdiv(P, 64)
    splits = min(max(triton.cdiv(2 * sms, row_blocks), 1), max(triton.cdiv(Q, 512), 1))
    return triton.cdiv(triton.cdiv(Q, splits), 256) * 256


def _thin_matmul(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    scale: float = 1.0,
    keep: torch.Tensor | None = None,
    out_dtype: torch.dtype,
    split_reduction: bool = False,
    transpose_out: bool = False,
    tf32: bool = False,
) -> torch.Tensor:
    """``scale * (x * keep) @ y`` for x (P, Q) and y (Q, R) with R <= 128; any strides.

    Args:
        split_reduction: split Q over several programs and sum fp32 partials (for long reductions into few rows).
        transpose_out: return the result as a contiguous (R, P) tensor (the layout of lora_A for dA).
    """
    P, Q = x.shape
    Q2, R = y.shape
    assert Q == Q2, f"reduction mismatch: x {tuple(x.shape)} @ y {tuple(y.shape)}"
    assert 1 <= R <= MAX_RANK, f"rank {R} outside 1..{MAX_RANK}"
    assert x.dtype == y.dtype, f"dtype mismatch: {x.dtype} vs {y.dtype}"
    if keep is not None:
        assert keep.shape == x.shape and keep.dtype == torch.uint8
    out_shape = (R, P) if transpose_out else (P, R)
    if P == 0 or Q == 0:
        return torch.zeros(out_shape, dtype=out_dtype, device=x.device)

    interpret = interpreting()
    q_per_split = _q_per_split(P, Q, x.device, interpret) if split_reduction else Q
    splits = triton.cdiv(Q, q_per_split)
    if splits > 1:  # fp32 partial sums, one slab per split, summed below
        out = torch.empty((splits, *out_shape), dtype=torch.float32, device=x.device)
    else:
        out = torch.empty((1, *out_shape), dtype=out_dtype, device=x.device)
    stride_os = out.stride(0)
    stride_op, stride_or = (out.stride(2), out.stride(1)) if transpose_out else (out.stride(1), out.stride(2))
    keep_arg = keep if keep is not None else x  # dummy pointer, never read when HAS_KEEP is False
    dot_fp32, precision = dot_flags(x.dtype, interpret, tf32)

    args = (
        x, keep_arg, y, out,
        P, Q, R, q_per_split,
        x.stride(0), x.stride(1),
        keep_arg.stride(0), keep_arg.stride(1),
        y.stride(0), y.stride(1),
        stride_os, stride_op, stride_or,
        float(scale),
        next_pow2(P), next_pow2(Q),
    )
    meta = dict(HAS_KEEP=keep is not None, DOT_FP32=dot_fp32, INPUT_PRECISION=precision, BLOCK_R=rank_block(R))
    if interpret:
        grid = (triton.cdiv(P, _INTERPRET_THIN_CONFIG["BLOCK_P"]), splits)
        interpreted(_thin_matmul_kernel)[grid](*args, **meta, **_INTERPRET_THIN_CONFIG)
    else:
        grid = lambda META: (triton.cdiv(P, META["BLOCK_P"]), splits)  # noqa: E731
        _thin_matmul_autotuned[grid](*args, **meta)

    return out[0] if splits == 1 else out.sum(dim=0).to(out_dtype)


def _fused_lora_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    t: torch.Tensor,
    u: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    keep_scale: float = 1.0,
    tf32: bool = False,
) -> torch.Tensor:
    """``a @ b + (t @ u) * keep * keep_scale + bias`` for a (M, K), b (K, N), t (M, R), u (R, N).

    Any strides (W^T is passed as ``weight.t()``, no copy). The result is a new contiguous (M, N) tensor in a's dtype.
    """
    M, K = a.shape
    K2, N = b.shape
    M2, R = t.shape
    R2, N2 = u.shape
    assert K == K2 and M == M2 and R == R2 and N == N2, (
        f"shape mismatch: a {tuple(a.shape)} b {tuple(b.shape)} t {tuple(t.shape)} u {tuple(u.shape)}"
    )
    assert 1 <= R <= MAX_RANK, f"rank {R} outside 1..{MAX_RANK}"
    assert a.dtype == b.dtype == t.dtype == u.dtype, f"dtypes differ: {a.dtype} {b.dtype} {t.dtype} {u.dtype}"
    if bias is not None:
        assert bias.shape == (N,), f"bias shape {tuple(bias.shape)} != ({N},)"
    if keep is not None:
        assert keep.shape == (M, N) and keep.dtype == torch.uint8

    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return out

    interpret = interpreting()
    keep_arg = keep if keep is not None else a  # dummy pointers, never read when the flag is False
    bias_arg = bias if bias is not None else a
    dot_fp32, precision = dot_flags(a.dtype, interpret, tf32)
    args = (
        a, b, t, u, keep_arg, bias_arg, out,
        M, N, K, R,
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1),
        t.stride(0), t.stride(1),
        u.stride(0), u.stride(1),
        keep_arg.stride(0), keep_arg.stride(1),
        out.stride(0), out.stride(1),
        float(keep_scale),
        next_pow2(M),
    )
    meta = dict(
        HAS_BIAS=bias is not None,
        HAS_KEEP=keep is not None,
        DOT_FP32=dot_fp32,
        INPUT_PRECISION=precision,
        BLOCK_R=rank_block(R),
    )
    if interpret:
        cfg = INTERPRET_FUSED_CONFIG
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        interpreted(_fused_lora_matmul_kernel)[grid](*args, **meta, **cfg)
    else:
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
        _fused_lora_matmul_autotuned[grid](*args, **meta)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------------------


class LoRALinearFunction(torch.autograd.Function):
    r"""Fused LoRA linear on 2-D input with a frozen base layer.

    Forward, with dropout as a keep-mask and c = 1 / (1 - p) (keep = 1, c = 1 without dropout),
    x_d = x * keep * c:

        u = s t = s x_d A^T                 (M, r)   the thin LoRA activation, already scaled; saved
        y = x W^T + b + u B^T               (M, N)

    Backward, given dY = dL/dy (M, N). Write y_ij = sum_k x_ik W_jk + b_j + s sum_q t_iq B_jq.

    * dB:  dL/dB_jq = sum_i dY_ij s t_iq = sum_i dY_ij u_iq          ->  dB = dY^T u                 (N, r)
    * dt:  dL/dt_iq = sum_j dY_ij s B_jq                              ->  dt = s dY B                 (M, r)
    * dA:  t_iq = sum_k x_d,ik A_qk, so dL/dA_qk = sum_i dt_iq x_d,ik  ->  dA = c dt^T (x * keep)     (r, K)
    * dX:  x enters twice, through the base term and through x_d = x * keep * c:
           dL/dx_ik = sum_j dY_ij W_jk + keep_ik c sum_q dt_iq A_qk   ->  dX = dY W + (dt A) * keep * c   (M, K)
    * W and b are frozen: no gradient (the forward refuses inputs that would need one).

    Storing u = s t rather than t makes dB a plain product and spares the kernels a rounding of s t. dX has the
    shape of the forward, a base GEMM (dY W) plus a rank-r update (dt A), so it reuses the fused kernel. Saved: x,
    u and the keep-mask; not y (no gradient above needs it), not dt (recomputed from dY, it is M x r).
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        keep: torch.Tensor | None,
        keep_scale: float,
        tf32: bool,
    ) -> torch.Tensor:
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise ValueError("the fused LoRA kernel needs a frozen base layer: weight/bias must not require grad")
        u = _thin_matmul(x, lora_A.t(), scale=scaling * keep_scale, keep=keep, out_dtype=x.dtype,
                         tf32=tf32)  # s t: (M, r)
        y = _fused_lora_matmul(x, weight.t(), u, lora_B.t(), bias=bias, tf32=tf32)  # x W^T + u B^T + b: (M, N)
        ctx.save_for_backward(x, weight, lora_A, lora_B, u, keep)
        ctx.scaling = scaling
        ctx.keep_scale = keep_scale
        ctx.tf32 = tf32
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, lora_A, lora_B, u, keep = ctx.saved_tensors
        need_x, _, _, need_A, need_B = ctx.needs_input_grad[:5]
        grad_x = grad_A = grad_B = None

        dt = None
        if need_x or need_A:
            dt = _thin_matmul(grad_y, lora_B, scale=ctx.scaling, out_dtype=x.dtype, tf32=ctx.tf32)  # s dY B: (M, r)
        if need_B:
            grad_B = _thin_matmul(  # dY^T u: (N, r); dY^T is a strided view, no copy
                grad_y.t(), u, out_dtype=lora_B.dtype, split_reduction=True, tf32=ctx.tf32
            )
        if need_A:
            grad_A = _thin_matmul(  # c (x * keep)^T dt, transposed straight into A's (r, K) layout
                x.t(), dt, scale=ctx.keep_scale, keep=None if keep is None else keep.t(),
                out_dtype=lora_A.dtype, split_reduction=True, transpose_out=True, tf32=ctx.tf32,
            )
        if need_x:
            grad_x = _fused_lora_matmul(  # dY W + (dt A) * keep * c
                grad_y, weight, dt, lora_A, keep=keep, keep_scale=ctx.keep_scale, tf32=ctx.tf32
            )
        return grad_x, None, None, grad_A, grad_B, None, None, None, None


# ---------------------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------------------


def lora_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    generator: torch.Generator | None = None,
    *,
    tf32: bool = False,
) -> torch.Tensor:
    """The fused kernels, always (CUDA, or CPU under ``TRITON_INTERPRET=1``). Same contract as the reference.

    The base ``weight``/``bias`` must not require grad. ``lora_A``/``lora_B`` are cast to x's dtype for the product
    (autograd casts their gradients back). The dropout mask is drawn with
    :func:`lora_mem.kernels.lora_reference.dropout_keep_mask`, so a generator in the same state gives the reference's mask.
    ``tf32``: fp32 products in TF32 (:class:`lora_mem.kernels.policy.KernelPolicy`'s switch).
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use lora_linear() to fall back to the reference")
    in_features = x.shape[-1]
    out_features, rank = lora_B.shape
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {x.dtype}; expected one of {SUPPORTED_DTYPES}")
    if weight.shape != (out_features, in_features) or weight.dtype != x.dtype:
        raise ValueError(f"weight {tuple(weight.shape)} {weight.dtype} does not fit x (..., {in_features}) {x.dtype} "
                         f"and lora_B {tuple(lora_B.shape)}")
    if lora_A.shape != (rank, in_features):
        raise ValueError(f"lora_A {tuple(lora_A.shape)} != ({rank}, {in_features})")
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"rank {rank} outside 1..{MAX_RANK}")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias {tuple(bias.shape)} != ({out_features},)")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")

    leading = x.shape[:-1]
    keep, keep_scale = None, 1.0
    if training and dropout_p > 0.0:
        keep = dropout_keep_mask(x.shape, dropout_p, x.device, generator).reshape(-1, in_features)
        keep_scale = dropout_keep_scale(dropout_p)
    y = LoRALinearFunction.apply(
        x.reshape(-1, in_features),  # (M, K); a view when x is contiguous
        weight,
        bias,
        lora_A.to(x.dtype),
        lora_B.to(x.dtype),
        float(scaling),
        keep,
        keep_scale,
        tf32,
    )
    return y.reshape(*leading, out_features)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    generator: torch.Generator | None = None,
    policy: KernelPolicy = KernelPolicy(),
) -> torch.Tensor:
    """``x W^T + b + scaling * (dropout(x) A^T) B^T``: the fused kernels where ``policy.use_triton(x)`` says so, else
    the PyTorch reference. A base layer that requires grad also takes the reference (the kernels only train A and B)."""
    base_trainable = torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))
    if policy.use_triton(x) and not base_trainable:
        return lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, generator,
                                  tf32=policy.tf32)
    return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, generator)
