"""MultiLoRALinear: one linear layer serving many LoRA adapters in one batch, each row with its own.

    y_i = x_i W^T + b + s[a_i] * (x_i A[a_i]^T) B[a_i]^T      a_i: row i's adapter (-1: none, the base output)

The adapters are stacked (A: (n, r, in), B: (n, out, r), s: (n,)), ranks zero-padded to the largest (zero rows of A
and columns of B add exactly nothing). Which adapter each row uses is not the layer's state: it comes with every
forward call (`rows`, planned once per forward pass by the model: lora_mem.kernels.multi_lora_linear.adapter_rows).
Forward only (serving), through lora_mem.kernels.multi_lora_linear.multi_lora_linear.

The layer wraps the LoRALinear it replaces (`base_layer`, whose `weight` / `bias` it shares): without rows it is that
layer, answering with its one adapter, and lora_mem.lora_core.multi_adapter.unstack_adapters puts it back.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_mem.kernels.multi_lora_linear import AdapterRows, multi_lora_linear
from lora_mem.kernels.policy import KernelPolicy
from lora_mem.lora_core.lora import LoRALinear


class MultiLoRALinear(nn.Module):
    def __init__(self, base_layer: LoRALinear, lora_A_stack: torch.Tensor, lora_B_stack: torch.Tensor,
                 scalings: torch.Tensor):
        super().__init__()
        n, rank, in_features = lora_A_stack.shape
        if in_features != base_layer.in_features or lora_B_stack.shape != (n, base_layer.out_features, rank):
            raise ValueError(f"stacks A {tuple(lora_A_stack.shape)} / B {tuple(lora_B_stack.shape)} do not fit a "
                             f"{base_layer.in_features} -> {base_layer.out_features} layer")
        if scalings.shape != (n,):
            raise ValueError(f"scalings {tuple(scalings.shape)} != ({n},)")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        # Buffers, not parameters: nothing here trains; non-persistent: not part of a checkpoint.
        self.register_buffer("lora_A_stack", lora_A_stack, persistent=False)  # (n, r, in)
        self.register_buffer("lora_B_stack", lora_B_stack, persistent=False)  # (n, out, r)
        self.register_buffer("scalings", scalings.float(), persistent=False)  # (n,)

    @property
    def n_adapters(self) -> int:
        return self.lora_A_stack.shape[0]

    def forward(self, x: torch.Tensor, policy: KernelPolicy = KernelPolicy(),
                rows: AdapterRows | None = None) -> torch.Tensor:
        """x (B, T, in) -> (B, T, out), each sequence with the adapter `rows.ids` names; without rows, the wrapped
        layer's one adapter."""
        if rows is None:
            return self.base_layer(x, policy)
        if self.base_layer.merged:
            raise RuntimeError("per-row adapters need the base layer unmerged: its adapter is folded into the weight")
        return multi_lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A_stack,
                                 self.lora_B_stack, self.scalings, rows.ids, plan=rows.plan, policy=policy)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, adapters={self.n_adapters}, "
                f"rank={self.lora_A_stack.shape[1]}")
