"""Many LoRA adapters in one batch: stack PEFT-format adapters into the model, then pick one per row.

    stack_adapters(model, ["runs/x/adapters/conv-26", "runs/x/adapters/conv-30"])
    generate(model, prompts, adapter_ids=[0, 1, 1, 0, ...])       # each prompt with its own adapter
    unstack_adapters(model)                                       # back to the one adapter each layer had

Every LoRA layer is wrapped in a MultiLoRALinear (lora_mem/lora_core/multi_lora.py) holding the stacks; rows index
into them (Punica / S-LoRA style; lora_mem/kernels/multi_lora_linear.py), so the base weights are read once for the
whole batch whatever the number of adapters. Adapters of different ranks share a stack by zero padding to the
largest rank; each keeps its own scaling. Which adapter each row uses is an argument of the model's forward
(`adapter_ids`), not state: without it a stacked model answers with the one adapter each layer had before.
A stacked model serves; unstack before training, saving or loading an adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lora_mem.kernels.lora_reference import lora_scaling
from lora_mem.lora_core.adapter_io import AdapterError, linear_layers, read_adapter
from lora_mem.lora_core.inject import LoRAConfig, inject_lora, lora_modules, replace_modules
from lora_mem.lora_core.multi_lora import MultiLoRALinear


def multi_lora_modules(model: nn.Module) -> dict[str, MultiLoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MultiLoRALinear)}


def stack_adapters(model: nn.Module, adapter_dirs: list[str | Path]) -> list[LoRAConfig]:
    """Load adapters (index i = adapter_dirs[i]) as stacks into the model, each LoRA layer wrapped in a
    MultiLoRALinear, injecting LoRA layers first (from the first adapter's config) if the model has none. All
    adapters must cover the same modules of this model. Adapters stacked earlier are replaced. Returns their
    configs."""
    if not adapter_dirs:
        raise AdapterError("no adapters to stack")
    dirs = [Path(d) for d in adapter_dirs]
    unstack_adapters(model)  # the layers adapters are checked against are the model's own, not stacks of earlier ones
    layers = linear_layers(model)
    return stack_adapter_weights(model, [(str(d), *read_adapter(d, layers)) for d in dirs])


def stack_adapter_weights(model: nn.Module, adapters: list[tuple[str, LoRAConfig, dict[str, torch.Tensor]]]
                          ) -> list[LoRAConfig]:
    """:func:`stack_adapters` of adapters already in memory: (name for messages, config, weights keyed
    `<module>.lora_A` / `<module>.lora_B` as `adapter_io.read_adapter_weights` gives them)."""
    if not adapters:
        raise AdapterError("no adapters to stack")
    unstack_adapters(model)
    dirs = [name for name, _, _ in adapters]
    configs = [c for _, c, _ in adapters]
    weights = [w for _, _, w in adapters]
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
    stacked = {}
    for name, m in modules.items():
        device = m.weight.device
        a_stack = torch.zeros(len(dirs), rank, m.in_features, device=device)
        b_stack = torch.zeros(len(dirs), m.out_features, rank, device=device)
        for i, (d, c, w) in enumerate(zip(dirs, configs, weights)):
            a, b = w[f"{name}.lora_A"], w[f"{name}.lora_B"]
            if a.shape != (c.rank, m.in_features) or b.shape != (m.out_features, c.rank):
                raise AdapterError(f"{d}: {name}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit "
                                   f"r={c.rank} and this layer ({m.in_features} -> {m.out_features}); "
                                   "other base model?")
            a_stack[i, :c.rank] = a.float()
            b_stack[i, :, :c.rank] = b.float()
        m.unmerge()  # the stacks add to the base weight itself
        stacked[name] = MultiLoRALinear(m, a_stack, b_stack, torch.tensor(scalings, device=device))
    replace_modules(model, stacked)
    return configs


def unstack_adapters(model: nn.Module) -> None:
    """Drop the stacks: every MultiLoRALinear gives its place back to the LoRALinear it wraps (a no-op on a model
    without stacks)."""
    replace_modules(model, {name: m.base_layer for name, m in multi_lora_modules(model).items()})
