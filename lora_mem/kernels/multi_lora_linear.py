"""Many LoRA adapters in one batch (Punica / S-LoRA style serving) in Triton, forward only.

    y_i = x_i W^T + b + s[a_i] * (x_i A[a_i]^T) B[a_i]^T      x: (M, K)  W: (N, K)  A: (n, r, K)  B: (n, N, r)  s: (n)

one adapter id a_i per row (-1: no adapter, base output only); the semantics, argument checks and the PyTorch
reference are in :mod:`lora_mem.kernels.multi_lora_reference`.

Design: sort the rows by adapter, then segment
-----------------------------------------------
Rows of one output tile may belong to different adapters, so the expand term t B[a]^T is not one tl.dot per tile.
The launcher sorts the row indices by adapter id (stable, on the device, no host sync) and marks for every sorted
position where its run of equal ids ends (:func:`plan_adapter_rows`). The kernels walk the tile's rows in sorted order
and loop over the runs ("segments") that overlap the tile; each segment is one masked tl.dot with its own adapter:

  1. ``_multi_shrink_kernel``        t = s[a] x A[a]^T   per row           (M, r), stored in sorted row order
     for each segment of the row tile: the K-loop of x_seg A[a]^T, loading only that segment's rows of x (the mask is
     the segment), so every row of x is read once and A[a] once per segment and tile. s[a] is applied per row at the
     end (one gather of M scalars).
  2. ``_multi_lora_matmul_kernel``   y = x W^T + b + t B[a]^T                (M, N)
     the base GEMM on the tile's rows (gathered from x through the sorted index), then per segment one more
     reduction step of width r into the same fp32 accumulator: tl.dot(t_seg, B[a]^T) with the other rows of t masked
     to zero. y is written once, scattered back to the original row order (no permuted copy of x or y is made).

Sorting is what makes each adapter's rows one contiguous range of positions, so a segment is two scalar loads (its id
and its end) and a range mask, with no reduction or search in the kernel. A tile does one expand step per segment it
overlaps: 1 for long per-adapter runs (prefill), at most BLOCK_M when every row has its own adapter (decode with
distinct requests), where each masked step multiplies one useful row; that extra work is at most BLOCK_M * r / K of
the base GEMM's, and the B[a] tiles it loads are needed anyway. Rows with id -1 sort first, form one segment, and are
skipped (never accumulated: t = 0 and y = x W^T + b for them).

Rejected alternatives: one tile per adapter segment (SGMV-style padded segments) re-reads W once per segment tile,
i.e. once per token in decode with distinct adapters; gathering B per row (BGMV-style) turns the expand step into r
rank-1 updates on the CUDA cores instead of a tl.dot. The masked-segment loop keeps the base GEMM's tiles dense and
full and is correct for any mix of ids.

Dispatch: :func:`multi_lora_linear` takes the kernels where the caller's
:class:`lora_mem.kernels.policy.KernelPolicy` says so (by default CUDA tensors), else the reference. Inference only: it
raises if autograd would need a gradient (call it under ``torch.no_grad()``).

Serving notes: keep the stacks in the activation dtype (they are cast per call otherwise). Every layer of a forward pass
sees the same rows, so a model plans them once per forward (:func:`adapter_rows`) and hands the plan to every layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lora_mem.kernels._common import (ACC_BYTES, FUSED_CONFIGS, HAS_TRITON, INTERPRET_FUSED_CONFIG, MAX_RANK,
                                      SM80_MAX_ACC_PER_THREAD, SUPPORTED_DTYPES, acc_per_thread, config_pool,
                                      dot_flags, interpreted, interpreting, next_pow2, pipeline_smem, rank_block,
                                      target_limits, uses_tensor_cores)
from lora_mem.kernels.multi_lora_reference import check_multi_lora_args, multi_lora_linear_reference, token_adapter_ids
from lora_mem.kernels.policy import KernelPolicy

from lora_mem.kernels._common import tl, triton

__all__ = ["AdapterRowPlan", "plan_adapter_rows", "multi_lora_linear_triton", "multi_lora_linear"]


# ---------------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------------

@triton.jit
def _multi_shrink_kernel(
    x_ptr,  # x (M, K) in the caller's row order (any strides)
    rows_ptr,  # (M,) int32: the row of x at each sorted position
    ids_ptr,  # (M,) int32: the adapter id at each sorted position (non-decreasing; -1 = no adapter)
    seg_end_ptr,  # (M,) int32: end (exclusive) of the run of equal ids holding each sorted position
    a_ptr,  # A stack (n_adapters, R, K) (any strides)
    s_ptr,  # scalings (n_adapters,) fp32
    t_ptr,  # out t (M, R), in sorted row order
    M,  # rows
    K,  # in_features: the reduction length
    R,  # the LoRA rank, <= BLOCK_R
    stride_xm, stride_xk,  # strides of x
    stride_an, stride_ar, stride_ak,  # strides of the A stack (adapter, rank, in)
    stride_tm, stride_tr,  # strides of t
    M_BUCKET,  # next power of two of M: autotune key only
    DOT_FP32: tl.constexpr,  # upcast operands to fp32 before tl.dot (bf16 under the interpreter)
    INPUT_PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands ("ieee" or "tf32")
    BLOCK_M: tl.constexpr,  # sorted rows per program
    BLOCK_K: tl.constexpr,  # reduction step
    BLOCK_R: tl.constexpr,  # the rank padded to a power of two >= 16 (tl.dot needs >= 16 per dimension)
):
    """t[m] = s[id[m]] * x[rows[m]] @ A[id[m]]^T for the sorted positions m of one row tile, fp32 accumulation;
    one K-loop per adapter segment overlapping the tile."""
    pid = tl.program_id(0)
    tile_start = pid * BLOCK_M
    offs_m = tile_start + tl.arange(0, BLOCK_M)  # sorted positions
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    r_mask = offs_r < R  # pads the rank up to BLOCK_R with zeros

    rows = tl.load(rows_ptr + offs_m, mask=m_mask, other=0)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm  # (BLOCK_M, 1): row starts, gathered

    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, dtype=tl.float32)
    pos = tile_start
    tile_end = tl.minimum(tile_start + BLOCK_M, M)
    while pos < tile_end:  # one iteration per segment (run of one adapter) overlapping the tile
        adapter = tl.load(ids_ptr + pos)
        seg_end = tl.load(seg_end_ptr + pos)
        if adapter >= 0:
            seg = (offs_m >= pos) & (offs_m < seg_end)  # this segment's rows of the tile (seg_end <= M)
            x_ptrs = x_rows + offs_k[None, :] * stride_xk
            a_ptrs = (a_ptr + adapter.to(tl.int64) * stride_an  # A[adapter]^T as a (K, R) view
                      + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar)
            for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
                k_mask = offs_k < K - k * BLOCK_K
                x = tl.load(x_ptrs, mask=seg[:, None] & k_mask[None, :], other=0.0)  # other rows read as 0
                a = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
                if DOT_FP32:
                    acc = tl.dot(x.to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(x, a, acc, input_precision=INPUT_PRECISION)
                x_ptrs += BLOCK_K * stride_xk
                a_ptrs += BLOCK_K * stride_ak
        pos = seg_end

    # Per-row scaling s[id]; rows without an adapter were never accumulated and stay 0.
    ids = tl.load(ids_ptr + offs_m, mask=m_mask, other=-1)
    s = tl.load(s_ptr + ids, mask=ids >= 0, other=0.0)
    acc = acc * s[:, None]
    t_ptrs = t_ptr + offs_m[:, None].to(tl.int64) * stride_tm + offs_r[None, :] * stride_tr
    tl.store(t_ptrs, acc.to(t_ptr.dtype.element_ty), mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _multi_lora_matmul_kernel(
    x_ptr,  # x (M, K) in the caller's row order (any strides)
    w_ptr,  # W^T (K, N): a strided view of the base weight W (N, K)
    t_ptr,  # t (M, R) = s[a] x A[a]^T in sorted row order, from _multi_shrink_kernel
    lb_ptr,  # LoRA B stack (n_adapters, N, R) (any strides)
    rows_ptr,  # (M,) int32: the row of x / out at each sorted position
    ids_ptr,  # (M,) int32: the adapter id at each sorted position (non-decreasing; -1 = no adapter)
    seg_end_ptr,  # (M,) int32: end (exclusive) of the run of equal ids holding each sorted position
    bias_ptr,  # bias (N); unused unless HAS_BIAS
    out_ptr,  # out (M, N) in the caller's row order
    M, N, K,  # problem sizes of the base GEMM
    R,  # the LoRA rank, <= BLOCK_R
    stride_xm, stride_xk,  # strides of x
    stride_wk, stride_wn,  # strides of W^T
    stride_tm, stride_tr,  # strides of t
    stride_bn, stride_bo, stride_br,  # strides of the B stack (adapter, out, rank)
    stride_om, stride_on,  # strides of out
    M_BUCKET,  # next power of two of M: autotune key only
    HAS_BIAS: tl.constexpr,  # add bias[N] in the epilogue
    DOT_FP32: tl.constexpr,  # upcast operands to fp32 before tl.dot (bf16 under the interpreter)
    INPUT_PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands ("ieee" or "tf32")
    BLOCK_M: tl.constexpr,  # sorted rows of out per program
    BLOCK_N: tl.constexpr,  # columns of out per program
    BLOCK_K: tl.constexpr,  # reduction step of the base GEMM
    BLOCK_R: tl.constexpr,  # the rank padded to a power of two >= 16
    GROUP_M: tl.constexpr,  # row blocks per group in the launch order (L2 reuse, as in the Triton matmul tutorial)
):
    """out[rows[m]] = x[rows[m]] @ W^T + t[m] @ B[id[m]]^T + bias for the sorted positions m of one tile: one fp32
    accumulator, the expand term one masked reduction step of width R per adapter segment, written once."""
    # Grouped launch order: consecutive programs share row blocks of x and column blocks of W in L2.
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    tile_start = pid_m * BLOCK_M
    offs_m = tile_start + tl.arange(0, BLOCK_M)  # sorted positions
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # The expand reduction (the rank) runs in steps of at most BLOCK_K and 64, as lora_mem.kernels.lora_linear's
    # does: one step of the whole rank holds rank-wide operand fragments at once (rank 128 spills).
    R_STEP: tl.constexpr = min(BLOCK_K, BLOCK_R, 64)
    offs_r = tl.arange(0, R_STEP)
    rows = tl.load(rows_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)  # (BLOCK_M,): rows of x and out

    # --- base GEMM: acc = x[rows] @ W^T ----------------------------------------------------------------------
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :].to(tl.int64) * stride_wn
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        k_mask = offs_k < K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # --- expand: per adapter segment of the tile, more reduction steps t_seg @ B[a]^T --------------------------
    t_rows = t_ptr + offs_m[:, None].to(tl.int64) * stride_tm
    pos = tile_start
    tile_end = tl.minimum(tile_start + BLOCK_M, M)
    while pos < tile_end:
        adapter = tl.load(ids_ptr + pos)
        seg_end = tl.load(seg_end_ptr + pos)
        if adapter >= 0:
            seg = (offs_m >= pos) & (offs_m < seg_end)  # this segment's rows; the others load as zeros
            u_cols = lb_ptr + adapter.to(tl.int64) * stride_bn + offs_n[None, :].to(tl.int64) * stride_bo
            for r0 in range(0, R, R_STEP):
                r_mask = offs_r < R - r0  # pads the rank up to the step with zeros
                t = tl.load(t_rows + (r0 + offs_r)[None, :] * stride_tr, mask=seg[:, None] & r_mask[None, :],
                            other=0.0)
                u = tl.load(u_cols + (r0 + offs_r)[:, None] * stride_br,  # B[adapter]^T as an (R, N) view
                            mask=r_mask[:, None] & n_mask[None, :], other=0.0)
                if DOT_FP32:
                    acc = tl.dot(t.to(tl.float32), u.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(t, u, acc, input_precision=INPUT_PRECISION)
        pos = seg_end

    # --- epilogue: bias, one store scattered back to the caller's row order ------------------------------------
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# GPU configs: the single-adapter kernel's pools (tensor cores; fp32 at full precision on the FMA units) plus small
# row blocks for decode (a few tokens per step, often each with its own adapter, where a tall tile only adds
# masked rows and masked segment steps).
_MULTI_FUSED_CONFIGS = FUSED_CONFIGS + [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=4),
]
# fp32 on the FMA units: smaller than the single-adapter kernel's (its tiles spill beside the row gather); these
# compile without spills at ranks 16 to 128 (bench/perf/compile_check.py).
_MULTI_FUSED_FP32_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=4),
]
_MULTI_SHRINK_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_K": 128}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 128}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_stages=3, num_warps=8),
]
_MULTI_SHRINK_FP32_CONFIGS = [  # likewise
    triton.Config({"BLOCK_M": 16, "BLOCK_K": 32}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 16}, num_stages=3, num_warps=4),
]
# The product kernel's expand step holds a B[a] tile of (rank step x BLOCK_N) operands: past this many bytes of it
# per thread the tile spills (fp32 in TF32 at ranks from 64 with 128-wide tiles).
_EXPAND_TILE_BYTES = 128
# At ranks from 64 the shrink kernel's tensor-core tiles spill (its A tile, BLOCK_K x rank, is live whole); these
# do not, in bf16 or in TF32.
_MULTI_SHRINK_WIDE_RANK_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_K": 32}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 64}, num_stages=3, num_warps=8),
]


def _prune_multi_configs(configs, named_args, **kwargs):
    """Drop row blocks taller than the (bucketed) token count and column blocks far wider than N; the smallest
    tile survives whatever is dropped."""
    m_cap = max(named_args["M_BUCKET"], 16)
    n_cap = max(triton.next_power_of_2(named_args["N"]), 64) if "N" in named_args else None
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] <= m_cap and (n_cap is None or c.kwargs["BLOCK_N"] <= n_cap)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs.get("BLOCK_N", 1))]


def _multi_configs_for_launch(configs, named_args, **kwargs):
    """Both kernels' early_config_prune: the pool of the launch's dot, sized to the problem
    (:func:`_prune_multi_configs`), less what would not fit the GPU, by the single-adapter kernels' measures
    (:func:`lora_mem.kernels.lora_linear._fused_configs_for_launch`): shared memory, the product kernel's
    accumulator and expand tile per thread; the shrink kernel's tensor-core pool at ranks from 64 is its own small
    tiles."""
    x = named_args["x_ptr"]
    tensor_cores = uses_tensor_cores(x, kwargs["INPUT_PRECISION"])
    matmul = "N" in named_args  # else the shrink kernel
    arch, smem_limit, _ = target_limits()
    block_r = kwargs["BLOCK_R"]
    if matmul:
        pool = config_pool(configs, _MULTI_FUSED_FP32_CONFIGS, tensor_cores)
    elif not tensor_cores:
        pool = [c for c in configs if c in _MULTI_SHRINK_FP32_CONFIGS]
    elif block_r >= 64:
        pool = [c for c in configs if c in _MULTI_SHRINK_WIDE_RANK_CONFIGS]
    else:
        pool = [c for c in configs if c in _MULTI_SHRINK_CONFIGS]

    def smem(c):
        bm, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]
        cols = c.kwargs["BLOCK_N"] if matmul else block_r
        return pipeline_smem((bm + cols) * bk * x.element_size(), c.num_stages, tensor_cores)

    def spills(c):
        if not matmul:
            return False
        bn, threads = c.kwargs["BLOCK_N"], 32 * c.num_warps
        acc = acc_per_thread(c.kwargs["BLOCK_M"], bn, c.num_warps)
        expand = min(c.kwargs["BLOCK_K"], block_r, 64) * bn * x.element_size() / threads  # as R_STEP in the kernel
        return ((arch < 90 and acc > SM80_MAX_ACC_PER_THREAD)
                or (tensor_cores and (acc * x.element_size() > ACC_BYTES or expand > _EXPAND_TILE_BYTES)))

    pool = [c for c in pool if not spills(c)] or pool
    kept = [c for c in _prune_multi_configs(pool, named_args) if smem(c) <= smem_limit]
    return kept or [min(pool, key=smem)]


# Both kernels only read their inputs and overwrite their output, so autotuning's repeated launches are harmless.
# cache_results: the choice persists in Triton's cache directory (see lora_mem.kernels.lora_linear).
_multi_lora_matmul_autotuned = triton.autotune(
    configs=_MULTI_FUSED_CONFIGS + _MULTI_FUSED_FP32_CONFIGS,
    key=["M_BUCKET", "N", "K", "BLOCK_R", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _multi_configs_for_launch}, cache_results=True,
)(_multi_lora_matmul_kernel)
_multi_shrink_autotuned = triton.autotune(
    configs=_MULTI_SHRINK_CONFIGS + _MULTI_SHRINK_WIDE_RANK_CONFIGS + _MULTI_SHRINK_FP32_CONFIGS,
    key=["M_BUCKET", "K", "BLOCK_R", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _multi_configs_for_launch}, cache_results=True,
)(_multi_shrink_kernel)

# Under the interpreter autotuning measures nothing: one small fixed config (16 is tl.dot's minimum tile side).
_INTERPRET_SHRINK_CONFIG = {"BLOCK_M": 16, "BLOCK_K": 16}


# ---------------------------------------------------------------------------------------------------------------------
# Row plan and launchers
# ---------------------------------------------------------------------------------------------------------------------


class AdapterRowPlan(NamedTuple):
    """Rows sorted by adapter, as the kernels walk them. All (M,) int32 on the rows' device."""

    rows: torch.Tensor  # the original row at each sorted position
    ids: torch.Tensor  # the adapter id at each sorted position, non-decreasing (-1 rows first)
    seg_end: torch.Tensor  # end (exclusive) of the run of equal ids holding each sorted position


def plan_adapter_rows(token_ids: torch.Tensor) -> AdapterRowPlan:
    """Sort per-row adapter ids (M,) into an :class:`AdapterRowPlan`: a stable sort and a searchsorted on the device,
    no host sync. Every projection of a batch sees the same ids, so a model can build this once per forward."""
    sorted_ids, order = torch.sort(token_ids.reshape(-1).to(torch.int64), stable=True)
    seg_end = torch.searchsorted(sorted_ids, sorted_ids, right=True)  # index after the last equal id
    return AdapterRowPlan(order.to(torch.int32), sorted_ids.to(torch.int32), seg_end.to(torch.int32))


class AdapterRows(NamedTuple):
    """Which adapter each sequence of a batch uses, for every multi-adapter layer of one forward pass."""

    ids: torch.Tensor  # (B,) integer: the adapter of each sequence, -1 = none (base output only)
    plan: AdapterRowPlan | None  # the kernels' sort of the batch's token rows; None where the reference runs


def adapter_rows(adapter_ids: torch.Tensor, x: torch.Tensor, policy: KernelPolicy) -> AdapterRows:
    """The routing of one forward pass whose layers see inputs shaped like x (B, T, C) (or (M, C)): the row plan is
    made here, once, when the kernels will run."""
    plan = plan_adapter_rows(token_adapter_ids(adapter_ids, x)) if policy.use_triton(x) else None
    return AdapterRows(adapter_ids, plan)


def _multi_shrink(x: torch.Tensor, plan: AdapterRowPlan, a_stack: torch.Tensor, scalings: torch.Tensor,
                  tf32: bool = False) -> torch.Tensor:
    """t = s[a] x A[a]^T per row for x (M, K), A stack (n, R, K), fp32 scalings (n,): (M, R) in sorted row order,
    x's dtype."""
    M, K = x.shape
    _, R, _ = a_stack.shape
    t = torch.empty((M, R), dtype=x.dtype, device=x.device)
    interpret = interpreting()
    dot_fp32, precision = dot_flags(x.dtype, interpret, tf32)
    args = (
        x, plan.rows, plan.ids, plan.seg_end, a_stack, scalings, t,
        M, K, R,
        x.stride(0), x.stride(1),
        a_stack.stride(0), a_stack.stride(1), a_stack.stride(2),
        t.stride(0), t.stride(1),
        next_pow2(M),
    )
    meta = dict(DOT_FP32=dot_fp32, INPUT_PRECISION=precision, BLOCK_R=rank_block(R))
    if interpret:
        grid = (triton.cdiv(M, _INTERPRET_SHRINK_CONFIG["BLOCK_M"]),)
        interpreted(_multi_shrink_kernel)[grid](*args, **meta, **_INTERPRET_SHRINK_CONFIG)
    else:
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]),)  # noqa: E731
        _multi_shrink_autotuned[grid](*args, **meta)
    return t


def _multi_lora_matmul(x: torch.Tensor, w_t: torch.Tensor, t: torch.Tensor, b_stack: torch.Tensor,
                       plan: AdapterRowPlan, bias: torch.Tensor | None, tf32: bool = False) -> torch.Tensor:
    """y = x W^T + b + t B[a]^T per row for x (M, K), W^T (K, N), t (M, R) in sorted order, B stack (n, N, R):
    a new contiguous (M, N) tensor in x's dtype, rows in x's order."""
    M, K = x.shape
    N = w_t.shape[1]
    R = t.shape[1]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if N == 0:
        return out
    interpret = interpreting()
    dot_fp32, precision = dot_flags(x.dtype, interpret, tf32)
    bias_arg = bias if bias is not None else x  # dummy pointer, never read when HAS_BIAS is False
    args = (
        x, w_t, t, b_stack, plan.rows, plan.ids, plan.seg_end, bias_arg, out,
        M, N, K, R,
        x.stride(0), x.stride(1),
        w_t.stride(0), w_t.stride(1),
        t.stride(0), t.stride(1),
        b_stack.stride(0), b_stack.stride(1), b_stack.stride(2),
        out.stride(0), out.stride(1),
        next_pow2(M),
    )
    meta = dict(HAS_BIAS=bias is not None, DOT_FP32=dot_fp32, INPUT_PRECISION=precision, BLOCK_R=rank_block(R))
    if interpret:
        cfg = INTERPRET_FUSED_CONFIG
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        interpreted(_multi_lora_matmul_kernel)[grid](*args, **meta, **cfg)
    else:
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
        _multi_lora_matmul_autotuned[grid](*args, **meta)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------------------


def _check_inference_only(*tensors: torch.Tensor | None) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError("multi-adapter LoRA is forward-only (serving): call it under torch.no_grad(), or detach "
                         "the inputs; train one adapter at a time with lora_mem.kernels.lora_linear.lora_linear")


def multi_lora_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A_stack: torch.Tensor,
    lora_B_stack: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
    *,
    plan: AdapterRowPlan | None = None,
    tf32: bool = False,
) -> torch.Tensor:
    """The kernels, always (CUDA, or CPU under ``TRITON_INTERPRET=1``). Same contract as
    :func:`lora_mem.kernels.multi_lora_reference.multi_lora_linear_reference`.

    The stacks are cast to x's dtype (a copy per call unless they already are), ``scalings`` to fp32. ``plan``: the
    :func:`plan_adapter_rows` of ``token_adapter_ids(adapter_ids, x)``, when the caller already has it (it is not
    re-checked against ``adapter_ids``). ``tf32``: fp32 products in TF32 (the kernel policy's switch).
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use multi_lora_linear() to fall back to the reference")
    _check_inference_only(x, weight, bias, lora_A_stack, lora_B_stack, scalings)
    check_multi_lora_args(x, weight, bias, lora_A_stack, lora_B_stack, scalings, adapter_ids)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {x.dtype}; expected one of {SUPPORTED_DTYPES}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} != x dtype {x.dtype}")
    rank = lora_A_stack.shape[1]
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"rank {rank} outside 1..{MAX_RANK}")
    tensors = [weight, lora_A_stack, lora_B_stack, scalings] + ([bias] if bias is not None else [])
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"all tensors must be on x's device {x.device}")

    in_features, out_features = x.shape[-1], weight.shape[0]
    leading = x.shape[:-1]
    x2 = x.reshape(-1, in_features)  # (M, K); a view when x is contiguous
    M = x2.shape[0]
    if M == 0:
        return torch.empty(*leading, out_features, dtype=x.dtype, device=x.device)
    if plan is None:
        plan = plan_adapter_rows(token_adapter_ids(adapter_ids, x))
    elif plan.rows.shape != (M,):
        raise ValueError(f"plan covers {plan.rows.shape[0]} rows, x has {M}")

    a_stack = lora_A_stack.to(x.dtype)
    b_stack = lora_B_stack.to(x.dtype)
    t = _multi_shrink(x2, plan, a_stack, scalings.to(torch.float32), tf32)  # (M, r) sorted: s[a] x A[a]^T
    y = _multi_lora_matmul(x2, weight.t(), t, b_stack, plan, bias, tf32)  # (M, N): x W^T + b + t B[a]^T
    return y.reshape(*leading, out_features)


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A_stack: torch.Tensor,
    lora_B_stack: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
    *,
    plan: AdapterRowPlan | None = None,
    policy: KernelPolicy = KernelPolicy(),
) -> torch.Tensor:
    """``x_i W^T + b + s[a_i] (x_i A[a_i]^T) B[a_i]^T`` per row (a_i = -1: base only): the kernels where
    ``policy.use_triton(x)`` says so (with ``plan``, when the caller made it, see :func:`adapter_rows`), else the
    PyTorch reference. Forward only: raises ValueError if autograd would need a gradient, on either path."""
    _check_inference_only(x, weight, bias, lora_A_stack, lora_B_stack, scalings)
    if policy.use_triton(x):
        return multi_lora_linear_triton(x, weight, bias, lora_A_stack, lora_B_stack, scalings, adapter_ids, plan=plan,
                                        tf32=policy.tf32)
    return multi_lora_linear_reference(x, weight, bias, lora_A_stack, lora_B_stack, scalings, adapter_ids)
