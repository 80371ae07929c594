"""Causal self-attention as block GEMMs that skip the masked half: the CPU training path.

On CPU, PyTorch's fused SDPA kernel (flash attention for CPU) runs its forward and backward at a fraction of
the GEMM rate (`bench.perf.step_floor` times both), so attention costs far more of a training step than its
share of the FLOPs. Here the queries are cut into blocks of `block` rows; block i attends keys [0, end_i) only, so the upper triangle
beyond each block's diagonal is never computed (with 128-row blocks at T = 512, 62.5% of the full
T x T products), and every product is one batched GEMM that MKL runs at its GEMM rate:

    scores_i = scale * Q_i K[:end_i]^T + bias_i       (one baddbmm: scale and causal bias in the GEMM)
    P_i      = softmax(scores_i)                      (saved for backward)
    O_i      = P_i V[:end_i]

Grouped-query attention folds the g query heads of a key/value head into the query axis of that head's
product (B*Hkv, g*rows, D), so keys and values are never repeated. The backward (`BlockCausalAttention`, its
docstring derives it) is block GEMMs again, with dK and dV accumulated in place.

The price is memory: P_i is kept for backward, (B*H, T, T) x (nb + 1) / (2 nb) floats per layer (5.6 MiB at
B = 1, H = 9, T = 512), where flash attention keeps one log-sum-exp per row. `bench.perf.attention` measures
where this pays against SDPA; `lora_mem.model.qwen2.Attention` uses it where `use_block_causal` says: on CPU, when
gradients are needed and BLOCK_CAUSAL_MIN_T <= T <= BLOCK_CAUSAL_MAX_T, unless the kernel policy's
``cpu_attention`` is ``sdpa``. The reference is `F.scaled_dot_product_attention(..., is_causal=True)`;
tests/test_block_causal_attention.py holds the two together, forward and gradients.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from lora_mem.kernels.policy import KernelPolicy

DEFAULT_BLOCK = 128
# Where the block path runs: from the length where it beats SDPA forward + backward (`bench.perf.attention`; at
# 128 tokens there is one block and nothing to skip). Past BLOCK_CAUSAL_MAX_T the saved probabilities (quadratic in
# T) cost more memory than a training step should spend on attention; SDPA's flash kernel, which keeps none, runs.
BLOCK_CAUSAL_MIN_T = 256
BLOCK_CAUSAL_MAX_T = 1024


def use_block_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, policy: KernelPolicy = KernelPolicy()) -> bool:
    """Whether causal attention over q (B, H, T, D), k, v takes the block path: CPU training only, where
    ``policy.cpu_attention`` is ``blocks`` (its default; ``sdpa``: PyTorch's kernel everywhere, the "before" side of
    `bench.perf.train_throughput`). Inference keeps SDPA: the forward alone is slower in blocks at every length measured
    (`bench.perf.attention`'s "answer" columns); the gain is in backward."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return (policy.cpu_attention == "blocks" and needs_grad and q.device.type == "cpu"
            and BLOCK_CAUSAL_MIN_T <= q.shape[2] <= BLOCK_CAUSAL_MAX_T)


def causal_bias(rows: int, start: int, end: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(rows, end) additive mask of query block [start, start + rows): 0 where key j <= query, -inf above."""
    query = torch.arange(start, start + rows, device=device)[:, None]
    key = torch.arange(end, device=device)[None, :]
    bias = torch.zeros(rows, end, dtype=dtype, device=device)
    return bias.masked_fill_(key > query, float("-inf"))


@lru_cache(maxsize=64)
def grouped_causal_bias(rows: int, start: int, end: int, groups: int, dtype: torch.dtype,
                        device: torch.device) -> torch.Tensor:
    """`causal_bias` repeated for ``groups`` stacked query heads, (groups*rows, end); every layer's block of the same
    shape reads the same one (never written: baddbmm takes it as input)."""
    return causal_bias(rows, start, end, dtype, device).repeat(groups, 1)


class BlockCausalAttention(torch.autograd.Function):
    """Forward and backward of block-causal attention, one query block at a time.

    Per block i of queries Q_i (g*rows x D per key/value head), with K_s, V_s the keys and values it sees
    ([0, end_i)), S_i = scale Q_i K_s^T + bias_i, P_i = softmax(S_i) (rows) and O_i = P_i V_s:

        dV_s += P_i^T dO_i
        dP_i  = dO_i V_s^T
        dS_i  = P_i * (dP_i - delta_i),  delta_i = rowsum(dP_i * P_i) = rowsum(dO_i * O_i)   (softmax backward)
        dQ_i  = scale dS_i K_s
        dK_s += scale dS_i^T Q_i

    delta comes from the output (one product over D per row, as flash attention does), not from the
    (rows x end) probabilities. dK and dV accumulate in place in one buffer each (fp32 for 16-bit inputs): no
    per-block gradient tensor the size of K. P_i is saved for backward; nothing is recomputed."""

    @staticmethod
    def forward(ctx, q, k, v, block: int):
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        g, scale = H // Hkv, D ** -0.5
        with torch.profiler.record_function("block_causal_attention"):  # a label for bench profiles
            k_all = k.reshape(B * Hkv, T, D)  # a view when k is contiguous
            v_all = v.reshape(B * Hkv, T, D)
            out = q.new_empty(B, Hkv, g, T, D)  # = (B, H, T, D): query head h = kv * g + j
            probs = []
            for start in range(0, T, block):
                rows = min(block, T - start)
                end = start + rows  # keys [0, end): everything at or before this block's last query
                q_block = query_block(q, Hkv, start, end)  # (B*Hkv, g*rows, D): a group's heads stacked
                bias = grouped_causal_bias(rows, start, end, g, q.dtype, q.device)  # (g*rows, end)
                scores = torch.baddbmm(bias.unsqueeze(0), q_block, k_all[:, :end].transpose(1, 2), alpha=scale)
                # the CPU kernel accumulates 16-bit inputs in fp32, as SDPA's do: the same bits as a softmax
                # computed in fp32 and rounded (test_softmax_16bit_is_fp32_rounded), without the two copies
                p = torch.softmax(scores, dim=-1)  # (B*Hkv, g*rows, end)
                out[:, :, :, start:end] = torch.bmm(p, v_all[:, :end]).view(B, Hkv, g, rows, D)
                probs.append(p)
        ctx.save_for_backward(q, k_all, v_all, out, *probs)
        ctx.block, ctx.kv_shape = block, k.shape
        return out.view(B, H, T, D)

    @staticmethod
    def backward(ctx, grad_out):
        q, k_all, v_all, out, *probs = ctx.saved_tensors
        B, H, T, D = q.shape
        Hkv, g, scale = k_all.shape[0] // B, out.shape[2], D ** -0.5
        acc = torch.float32 if q.element_size() < 4 else q.dtype  # dK, dV accumulate in fp32 for 16-bit inputs
        d_out = grad_out.reshape(B, Hkv, g, T, D)
        delta = (d_out.to(acc) * out.to(acc)).sum(-1, keepdim=True)  # (B, Hkv, g, T, 1)
        dq = torch.empty_like(out)  # (B, Hkv, g, T, D)
        dk = torch.zeros(B * Hkv, T, D, dtype=acc, device=q.device)
        dv = torch.zeros(B * Hkv, T, D, dtype=acc, device=q.device)
        for i, start in enumerate(range(0, T, ctx.block)):
            rows = min(ctx.block, T - start)
            end = start + rows
            p = probs[i]  # (B*Hkv, g*rows, end)
            d_out_block = d_out[:, :, :, start:end].reshape(B * Hkv, g * rows, D)
            delta_block = delta[:, :, :, start:end].reshape(B * Hkv, g * rows, 1)
            q_block = query_block(q, Hkv, start, end)
            accumulate(dv[:, :end], p.transpose(1, 2), d_out_block, 1.0)
            d_scores = torch.bmm(d_out_block, v_all[:, :end].transpose(1, 2))  # dP (B*Hkv, g*rows, end)
            d_scores = torch.sub(d_scores, delta_block).mul_(p).to(q.dtype)  # dS: 16-bit dP minus fp32 delta in fp32
            dq_block = torch.bmm(d_scores, k_all[:, :end]).mul_(scale)  # (B*Hkv, g*rows, D)
            dq[:, :, :, start:end] = dq_block.view(B, Hkv, g, rows, D)
            accumulate(dk[:, :end], d_scores.transpose(1, 2), q_block, scale)
        return (dq.view(B, H, T, D), dk.to(q.dtype).view(ctx.kv_shape), dv.to(q.dtype).view(ctx.kv_shape), None)


def query_block(q: torch.Tensor, Hkv: int, start: int, end: int) -> torch.Tensor:
    """q (B, H, T, D) rows [start, end) as (B*Hkv, g*rows, D): the g query heads of a key/value head stacked."""
    B, H, _, D = q.shape
    return q[:, :, start:end].reshape(B * Hkv, (H // Hkv) * (end - start), D)


def accumulate(buf: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """buf += alpha * a @ b (batched), in place; buf may be fp32 for 16-bit a, b."""
    if buf.dtype == a.dtype:
        buf.baddbmm_(a, b, alpha=alpha)
    else:
        buf.add_(torch.bmm(a, b).to(buf.dtype), alpha=alpha)


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """Causal attention of q (B, H, T, D) over k, v (B, Hkv, T, D), H a multiple of Hkv -> (B, H, T, D).

    Same result as `F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)` up to
    rounding; softmax in fp32 for 16-bit inputs, as SDPA's kernels accumulate."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if k.shape != (B, Hkv, T, D) or v.shape != k.shape or H % Hkv != 0:
        raise ValueError(f"block_causal_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                         "want q (B, H, T, D) and k, v (B, Hkv, T, D) with H a multiple of Hkv")
    if block < 1:
        raise ValueError(f"block_causal_attention: block must be >= 1, got {block}")
    return BlockCausalAttention.apply(q, k, v, block)
