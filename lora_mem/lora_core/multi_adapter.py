"""Many LoRA adapters in one batch: stack PEFT-format adapters into every LoRALinear, then pick one per row.

    names = stack_adapters(model, ["runs/x/adapters/conv-26", "runs/x/adapters/conv-30"])
    generate(model, prompts, adapter_ids=[0, 1, 1, 0, ...])       # each prompt with its own adapter

Rows index into the stacks (Punica / S-LoRA style; lora_mem/kernels/multi_lora_linear.py), so the base weights
are read once for the whole batch whatever the number of adapters. Adapters of different ranks share a
stack by zero padding to the largest rank (zero rows of A and columns of B add exactly nothing); each
keeps its own scaling. A stacked model still answers one adapter at a time as before while no row
adapters are set.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lora_mem.kernels.lora_reference import lora_scaling
from lora_mem.lora_core.adapter_io import AdapterError, read_adapter_config, read_adapter_weights
from lora_mem.lora_core.inject import LoRAConfig, inject_lora, lora_modules


def stack_adapters(model: nn.Module, adapter_dirs: list[str | Path]) -> list[LoRAConfig]:
    """Load adapters (index i = adapter_dirs[i]) as stacks into the model's LoRA layers, injecting LoRA
    layers first (from the first adapter's config) if the model has none. All adapters must cover the
    same modules of this model. Returns their configs."""
    if not adapter_dirs:
        raise AdapterError("no adapters to stack")
    dirs = [Path(d) for d in adapter_dirs]
    configs = [read_adapter_config(d) for d in dirs]
    weights = [read_adapter_weights(d) for d in dirs]
    modules = lora_modules(model)
    if not modules:
        inject_lora(model, configs[0])
        modules = lora_modules(model)
    for d, w in zip(dirs, weights):
        file_modules = {k.rsplit(".", 1)[0] for k in w}
        if file_modules != set(modules):
            missing, extra = sorted(set(modules) - file_modules), sorted(file_modules - set(modules))
            raise AdapterError(f"{d}: adapter does not fit the model's LoRA layers (missing: {missing[:4]}, "
                               f"unexpected: {extra[:4]})")
    rank = max(c.rank for c in configs)
    scalings = [lora_scaling(c.rank, c.alpha, c.use_rslora) for c in configs]
    for name, m in modules.items():
        device = m.weight.device
        a_stack = torch.zeros(len(dirs), rank, m.in_features, device=device)
        b_stack = torch.zeros(len(dirs), m.out_features, rank, device=device)
        for i, (d, c, w) in enumerate(zip(dirs, configs, weights)):
            a, b = w[f"{name}.lora_A"], w[f"{name}.lora_B"]
            if a.shape != (c.rank, m.in_features) or b.shape != (m.out_features, c.rank):
                raise AdapterError(f"{d}: {name}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit "
                                   f"r={c.rank} and this layer ({m.in_features} -> {m.out_features}); other base model?")
            a_stack[i, :c.rank] = a.float()
            b_stack[i, :, :c.rank] = b.float()
        m.lora_A_stack, m.lora_B_stack = a_stack, b_stack
        m.lora_scalings = torch.tensor(scalings, dtype=torch.float32, device=device)
    return configs


def unstack_adapters(model: nn.Module) -> None:
    """Drop the stacks (and any row adapter ids): back to the one adapter in lora_A / lora_B."""
    for m in lora_modules(model).values():
        m.lora_A_stack = m.lora_B_stack = m.lora_scalings = m.row_adapter_ids = None
