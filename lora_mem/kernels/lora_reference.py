"""Plain-PyTorch LoRA linear: the reference every kernel is checked against, and the CPU path used in production.

    y = x W^T + b + s * (dropout(x) A^T) B^T

with a frozen base layer (``weight`` W: out x in, optional ``bias`` b: out), the adapter ``lora_A`` (A: r x in) and
``lora_B`` (B: out x r), and the scaling s = alpha / r (alpha / sqrt(r) with rsLoRA). Dropout acts on the LoRA branch
only, as in PEFT.

The low-rank update is never materialised as an out x in matrix: the branch goes through the thin t = x A^T (M x r)
and then t B^T, which costs 2 M r (in + out) flops instead of 2 M in out.

Dropout draws its keep-mask with :func:`dropout_keep_mask` (a torch generator, not ``F.dropout``), so the Triton path
in :mod:`lora_mem.kernels.lora_linear`, which draws its mask through the same function, gets the identical mask from the
identical generator state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["lora_scaling", "dropout_keep_mask", "dropout_keep_scale", "apply_dropout", "lora_linear_reference"]


def lora_scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor s multiplying the LoRA branch: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski,
    2023)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def dropout_keep_mask(
    shape: torch.Size | tuple[int, ...],
    p: float,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw the dropout keep-mask (1 = keep, with probability 1 - p) as uint8.

    uint8 rather than bool: a byte per element is what the Triton kernels load, and saving it for backward costs half
    of saving the dropped bf16 input.
    """
    keep = torch.empty(shape, dtype=torch.uint8, device=device)
    return keep.bernoulli_(1.0 - p, generator=generator)


def dropout_keep_scale(p: float) -> float:
    """1 / (1 - p): kept elements are scaled so the expectation is unchanged (p = 1 drops everything)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def apply_dropout(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout with a given keep-mask: ``x * keep / (1 - p)``."""
    return x * keep.to(x.dtype) * dropout_keep_scale(p)


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``x W^T + b + scaling * (dropout(x) A^T) B^T`` for x of shape (..., in); differentiable by autograd.

    Args:
        x: input (..., in).
        weight: frozen base weight W (out, in).
        bias: frozen base bias b (out) or None.
        lora_A: A (r, in); cast to x's dtype for the product (fp32 adapters on a bf16 base are fine).
        lora_B: B (out, r); cast likewise.
        scaling: s, see :func:`lora_scaling`.
        dropout_p: dropout probability on the LoRA branch; only used when ``training``.
        training: apply dropout.
        generator: torch generator for the dropout mask (None: the default generator of x's device).
    Returns:
        y (..., out) in x's dtype.
    """
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    leading = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])  # (M, in): 2-D, so the update below is one addmm_
    y = F.linear(x, weight, bias)  # (M, out)
    x_lora = x
    if training and dropout_p > 0.0:
        keep = dropout_keep_mask(x.shape, dropout_p, x.device, generator)
        x_lora = apply_dropout(x, keep, dropout_p)
    t = F.linear(x_lora, lora_A.to(x.dtype))  # (M, r): the thin intermediate
    # y += s t B^T in place, inside the GEMM (beta = 1): no (M, out) temporary and no separate pass to add it. F.linear's
    # backward does not need its output, so autograd allows the in-place update. The same numbers as
    # y.add_(t B^T, alpha=s), bit for bit (tested).
    y.addmm_(t, lora_B.to(x.dtype).t(), alpha=scaling)
    return y.view(*leading, y.shape[-1])
