"""LoRALinear: a frozen linear layer plus a trainable low-rank update, computed by the fused op.

    y = x W^T + b + s * (dropout(x) A^T) B^T,   A: (r, in), B: (out, r), s = alpha / r  (alpha / sqrt(r) rsLoRA)

The module keeps the `weight` / `bias` names of the layer it replaces, so a base checkpoint's
state dict loads into an injected model unchanged; the adapter adds `lora_A` and `lora_B`. It serves one adapter,
unmerged (the fused op) or merged into W (a plain linear). Many adapters in one batch are
lora_mem.lora_core.multi_lora.MultiLoRALinear; the base layer alone is lora_mem.lora_core.inject.lora_disabled.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lora_mem.kernels.lora_linear import lora_linear
from lora_mem.kernels.lora_reference import lora_scaling
from lora_mem.kernels.multi_lora_linear import AdapterRows
from lora_mem.kernels.policy import KernelPolicy


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.dropout, self.use_rslora = rank, float(alpha), float(dropout), use_rslora
        self.scaling = lora_scaling(rank, alpha, use_rslora)
        # Adapter weights stay fp32 (master weights for the optimizer) whatever the base dtype;
        # forward casts them to the activation dtype, which autograd carries back in fp32.
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, device=base.weight.device))
        self.merged = False  # True: the update is folded into `weight` (merge / unmerge)
        self.reset_lora_parameters()

    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A: Kaiming-uniform (a = sqrt(5), as nn.Linear and PEFT); B: zeros, so the update starts at 0."""
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) bound for fan_in
            self.lora_A.uniform_(-bound, bound, generator=generator)
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor, policy: KernelPolicy = KernelPolicy(),
                rows: AdapterRows | None = None) -> torch.Tensor:
        """x (..., in) -> (..., out) with this layer's adapter; `policy` picks the kernels. `rows` (per-row adapters,
        lora_mem.model.qwen2.project passes them) must be None: one adapter serves every row here."""
        if rows is not None:
            raise RuntimeError("a LoRALinear serves one adapter; per-row adapters need stacked adapters "
                               "(lora_mem.lora_core.multi_adapter.stack_adapters)")
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return lora_linear(
            x, self.weight, self.bias, self.lora_A.to(x.dtype), self.lora_B.to(x.dtype),
            self.scaling, self.dropout, self.training, policy=policy,
        )

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())  # (out, in)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into W (for plain-linear speed); calling it twice is a no-op."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}, "
                f"dropout={self.dropout}, rslora={self.use_rslora}, merged={self.merged}")
