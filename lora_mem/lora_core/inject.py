"""Put LoRALinear modules into a model by module name (and take them out), freeze everything else, count parameters."""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lora_mem.lora_core.lora import LoRALinear
from lora_mem.lora_core.multi_lora import MultiLoRALinear

# Every linear layer of the decoder; never the LM head (tied to the embeddings in small models).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float | None = None  # default 2 x rank
    dropout: float = 0.0
    use_rslora: bool = False
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha is None:
            self.alpha = 2.0 * self.rank
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def is_target(module_name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a string is a regex over the full name; a list matches the last name component(s)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def inject_lora(model: nn.Module, cfg: LoRAConfig, generator: torch.Generator | None = None) -> list[str]:
    """Replace the target nn.Linear modules by LoRALinear, freeze all other parameters.
    Returns the names of the wrapped modules (an error if none matched)."""
    model.requires_grad_(False)
    targets = [
        name for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not name.endswith("lm_head") and is_target(name, cfg.target_modules)
    ]
    if not targets:
        raise ValueError(f"no linear module matches target_modules={cfg.target_modules!r}")
    layers = {}
    for name in targets:
        lora = LoRALinear(model.get_submodule(name), cfg.rank, cfg.alpha, cfg.dropout, cfg.use_rslora)
        lora.reset_lora_parameters(generator)
        layers[name] = lora.train(model.training)  # the model's mode (dropout only while training)
    replace_modules(model, layers)
    return targets


def replace_modules(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Put each module of `modules` in the model under its name (a dotted path to an existing submodule)."""
    for name, module in modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module)


def plain_linear(m: LoRALinear) -> nn.Linear:
    """An nn.Linear holding the LoRA layer's own weight and bias tensors (no copy): its base layer."""
    linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
    linear.weight, linear.bias = m.weight, m.bias
    return linear


def remove_lora(model: nn.Module, modules: dict[str, LoRALinear] | None = None) -> None:
    """Put plain nn.Linear layers (the same weight and bias tensors, any merge undone) back in place of `modules`
    (default: every LoRA layer of the model)."""
    modules = lora_modules(model) if modules is None else modules
    for m in modules.values():
        m.unmerge()
    replace_modules(model, {name: plain_linear(m) for name, m in modules.items()})


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def reset_lora(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """A fresh adapter (new A, zero B) without re-injecting: one adapter per conversation."""
    for m in lora_modules(model).values():
        m.unmerge()
        m.reset_lora_parameters(generator)


@contextmanager
def lora_disabled(model: nn.Module):
    """The base model alone inside the block (e.g. to generate training data), whatever adapter is loaded: each LoRA
    layer gives its place to a plain nn.Linear on the same weight and bias (its merge undone first) and comes back
    after the block."""
    if any(isinstance(m, MultiLoRALinear) for m in model.modules()):
        raise RuntimeError("lora_disabled: the model has stacked adapters; unstack_adapters first")
    layers = lora_modules(model)
    remove_lora(model, layers)
    try:
        yield model
    finally:
        replace_modules(model, layers)


def trainable_summary(model: nn.Module) -> str:
    """The line users know from PEFT's print_trainable_parameters()."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
