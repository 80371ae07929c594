"""Causal self-attention as block GEMMs that skip the masked half: the CPU training path.

On CPU, PyTorch's fused SDPA kernel (flash attention for CPU) runs its forward and backward at a fraction of
the GEMM rate: the committed step floor (`bench/results/train_cpu.json`) has causal attention at 53 GFLOP/s
beside 181 GFLOP/s for the base GEMMs, so attention was 22% of the floor for 5% of its FLOPs. Here the
queries are cut into blocks of `block` rows; block i attends keys [0, end_i) only, so the upper triangle
beyond each block's diagonal is never computed (with 128-row blocks at T = 512, 62.5% of the full
T x T products), and every product is one batched GEMM that MKL runs at its GEMM rate:

    scores_i = scale * Q_i K[:end_i]^T + bias_i       (one baddbmm: scale and causal bias in the GEMM)
    P_i      = softmax(scores_i)                      (saved for backward)
    O_i      = P_i V[:end_i]

Grouped-query attention folds the g query heads of a key/value head into the query axis of that head's
product (B*Hkv, g*rows, D), so keys and values are never repeated. Autograd derives the backward (the
baddbmm and bmm gradients and the softmax's), which are GEMMs again.

The price is memory: P_i is kept for backward, (B*H, T, T) x (nb + 1) / (2 nb) floats per layer (5.9 MB at
B = 1, H = 9, T = 512), where flash attention keeps one log-sum-exp per row. `bench.attention` measures
where this pays against SDPA; `model.qwen2.Attention` uses it where `use_block_causal` says: on CPU, when
gradients are needed and T <= BLOCK_CAUSAL_MAX_T, unless ``LORA_MEM_CPU_ATTENTION=sdpa``. The reference is `F.scaled_dot_product_attention(..., is_causal=True)`;
tests/test_block_causal_attention.py holds the two together, forward and gradients.
"""

from __future__ import annotations

import os

import torch

DEFAULT_BLOCK = 128
# Past this length the saved probabilities (quadratic in T) cost more memory than a training step should
# spend on attention; SDPA's flash kernel, which keeps none, is used instead.
BLOCK_CAUSAL_MAX_T = 1024


def use_block_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether causal attention over q (B, H, T, D), k, v takes the block path: CPU training only.

    ``LORA_MEM_CPU_ATTENTION`` = ``blocks`` (default) or ``sdpa`` (PyTorch's kernel everywhere: the "before" side
    of `bench.train_throughput`). Inference keeps SDPA: without a backward there is nothing to win
    (`bench.attention` times the forward alone too)."""
    mode = os.environ.get("LORA_MEM_CPU_ATTENTION", "blocks").strip().lower() or "blocks"
    if mode not in ("blocks", "sdpa"):
        raise ValueError(f"LORA_MEM_CPU_ATTENTION must be blocks or sdpa, got {mode!r}")
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return mode == "blocks" and q.device.type == "cpu" and needs_grad and q.shape[2] <= BLOCK_CAUSAL_MAX_T


def causal_bias(rows: int, start: int, end: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(rows, end) additive mask of query block [start, start + rows): 0 where key j <= query, -inf above."""
    query = torch.arange(start, start + rows, device=device)[:, None]
    key = torch.arange(end, device=device)[None, :]
    bias = torch.zeros(rows, end, dtype=dtype, device=device)
    return bias.masked_fill_(key > query, float("-inf"))


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """Causal attention of q (B, H, T, D) over k, v (B, Hkv, T, D), H a multiple of Hkv -> (B, H, T, D).

    Same result as `F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)` up to
    rounding. Softmax runs in fp32 for lower-precision inputs, as SDPA's kernels accumulate."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if k.shape != (B, Hkv, T, D) or v.shape != k.shape or H % Hkv != 0:
        raise ValueError(f"block_causal_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                         "want q (B, H, T, D) and k, v (B, Hkv, T, D) with H a multiple of Hkv")
    if block < 1:
        raise ValueError(f"block_causal_attention: block must be >= 1, got {block}")
    g = H // Hkv
    scale = D ** -0.5
    outputs = []
    for start in range(0, T, block):
        rows = min(block, T - start)
        end = start + rows  # keys [0, end): everything at or before this block's last query
        q_block = q[:, :, start:end].reshape(B * Hkv, g * rows, D)  # (B*Hkv, g*rows, D): heads of a group stacked
        k_seen = k[:, :, :end].reshape(B * Hkv, end, D)  # (B*Hkv, end, D)
        v_seen = v[:, :, :end].reshape(B * Hkv, end, D)
        bias = causal_bias(rows, start, end, q.dtype, q.device).repeat(g, 1)  # (g*rows, end)
        scores = torch.baddbmm(bias.unsqueeze(0), q_block, k_seen.transpose(1, 2), alpha=scale)  # (B*Hkv, g*rows, end)
        if scores.element_size() < 4:  # bf16 / fp16: the softmax in fp32, as SDPA's kernels do
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        else:
            probs = torch.softmax(scores, dim=-1)
        out = torch.bmm(probs, v_seen)  # (B*Hkv, g*rows, D)
        outputs.append(out.view(B, H, rows, D))
    return torch.cat(outputs, dim=2)  # (B, H, T, D)
