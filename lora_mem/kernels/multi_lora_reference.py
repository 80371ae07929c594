"""Plain-PyTorch multi-adapter LoRA linear (Punica / S-LoRA style serving): many adapters in one batch.

    y_i = x_i W^T + b + s[a_i] * (x_i A[a_i]^T) B[a_i]^T        for every row i of the batch, a_i = adapter_ids[i]

with a frozen base layer (``weight`` W: out x in, optional ``bias`` b: out) shared by all rows, and stacks of
``n_adapters`` adapters of one rank r: ``lora_A_stack`` (n, r, in), ``lora_B_stack`` (n, out, r), ``scalings`` (n,).
``adapter_ids[i] == -1`` means no adapter: that row gets the base output only. Adapters of different ranks share a
stack by zero-padding to the largest rank (extra rows of A / columns of B that are zero add exactly nothing).

x is (B, T, in) with one adapter per sequence (``adapter_ids``: (B,)), or (M, in) with one adapter per row; in
general one id per index of x's first dimension, applying to every token under it.

Rows are grouped by adapter and each group goes through the thin path of the single-adapter reference
(:func:`lora_mem.kernels.lora_reference.lora_linear_reference`): t = x_g A^T (M_g x r), then t B^T added into the group's rows
of the base output. Cost: the base GEMM plus 2 M r (in + out) flops; no per-row gather of A or B and no out x in
update is ever materialised. This is the reference the Triton kernels in :mod:`lora_mem.kernels.multi_lora_linear` are held
against and the CPU path; forward only (serving), though made of ordinary differentiable torch ops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["check_multi_lora_args", "token_adapter_ids", "multi_lora_linear_reference"]


def check_multi_lora_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A_stack: torch.Tensor,
    lora_B_stack: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
) -> None:
    """Raise ValueError on inconsistent shapes or ids. The id range check costs a device sync only on the CPU: on
    CUDA it is an asynchronous device-side assert (``torch._assert_async``), so serving loops do not stall on it."""
    if x.dim() < 2:
        raise ValueError(f"x must be (M, in) or (B, T, in), got shape {tuple(x.shape)}")
    in_features = x.shape[-1]
    if lora_A_stack.dim() != 3 or lora_B_stack.dim() != 3:
        raise ValueError(f"lora_A_stack (n, r, in) and lora_B_stack (n, out, r) must be 3-D, got "
                         f"{tuple(lora_A_stack.shape)} and {tuple(lora_B_stack.shape)}")
    n_adapters, rank, a_in = lora_A_stack.shape
    out_features = weight.shape[0]
    if weight.shape != (out_features, in_features):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit x (..., {in_features})")
    if a_in != in_features or lora_B_stack.shape != (n_adapters, out_features, rank):
        raise ValueError(f"lora_A_stack {tuple(lora_A_stack.shape)} / lora_B_stack {tuple(lora_B_stack.shape)} do not "
                         f"fit ({n_adapters}, r, {in_features}) / ({n_adapters}, {out_features}, r)")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias {tuple(bias.shape)} != ({out_features},)")
    if scalings.shape != (n_adapters,) or not scalings.is_floating_point():
        raise ValueError(f"scalings must be a float tensor of shape ({n_adapters},), got {scalings.dtype} "
                         f"{tuple(scalings.shape)}")
    if (adapter_ids.shape != x.shape[:1] or adapter_ids.is_floating_point() or adapter_ids.is_complex()
            or adapter_ids.dtype == torch.bool):
        raise ValueError(f"adapter_ids must be an integer tensor of shape ({x.shape[0]},) (one id per row of x's "
                         f"first dimension), got {adapter_ids.dtype} {tuple(adapter_ids.shape)}")
    if adapter_ids.numel() == 0:
        return
    in_range = ((adapter_ids >= -1) & (adapter_ids < n_adapters)).all()
    if adapter_ids.is_cuda:
        torch._assert_async(in_range, f"adapter_ids must lie in [-1, {n_adapters})")
    elif not bool(in_range):
        raise ValueError(f"adapter_ids must lie in [-1, {n_adapters}) (-1: no adapter), got "
                         f"min {int(adapter_ids.min())} max {int(adapter_ids.max())}")


def token_adapter_ids(adapter_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The adapter id of every row of ``x.reshape(-1, in)``: (M,) int64, each id repeated over its sequence's tokens."""
    rows_per_id = math.prod(x.shape[1:-1])  # T for (B, T, in), 1 for (M, in)
    ids = adapter_ids.to(device=x.device, dtype=torch.int64)
    return ids if rows_per_id == 1 else ids.repeat_interleave(rows_per_id)


def multi_lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A_stack: torch.Tensor,
    lora_B_stack: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
) -> torch.Tensor:
    """``x_i W^T + b + s[a_i] (x_i A[a_i]^T) B[a_i]^T`` per row, for x of shape (M, in) or (B, T, in).

    Args:
        x: input (M, in) or (B, T, in).
        weight: frozen base weight W (out, in).
        bias: frozen base bias b (out) or None.
        lora_A_stack: A of every adapter (n_adapters, r, in); cast to x's dtype for the product.
        lora_B_stack: B of every adapter (n_adapters, out, r); cast likewise.
        scalings: s of every adapter (n_adapters,), a float tensor.
        adapter_ids: (x.shape[0],) integer tensor: the adapter of each row (of each sequence for 3-D x); -1 = none.
    Returns:
        y with x's leading shape and ``out`` features, in x's dtype.
    """
    check_multi_lora_args(x, weight, bias, lora_A_stack, lora_B_stack, scalings, adapter_ids)
    in_features, out_features = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, in_features)  # (M, in)
    ids = token_adapter_ids(adapter_ids, x)  # (M,)
    y = F.linear(x2, weight, bias)  # (M, out): the base output of every row
    scale = scalings.detach().to("cpu", torch.float64).tolist()
    for a in torch.unique(ids).tolist():  # one group of rows per adapter present in the batch
        if a < 0:
            continue  # no adapter: base output only
        rows = (ids == a).nonzero().squeeze(1)  # (M_a,)
        t = F.linear(x2.index_select(0, rows), lora_A_stack[a].to(x.dtype))  # (M_a, r): the thin intermediate
        # In place on the fresh base output (as the single-adapter reference): no second (M, out) temporary.
        y.index_add_(0, rows, F.linear(t, lora_B_stack[a].to(x.dtype)), alpha=scale[a])
    return y.reshape(*x.shape[:-1], out_features)
