"""Put LoRALinear modules into a model by module name, freeze everything else, count parameters."""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lora_mem.lora_core.lora import LoRALinear

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
        if self.alpha is None:
            self.alpha = 2.0 * self.rank

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
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lora = LoRALinear(getattr(parent, child), cfg.rank, cfg.alpha, cfg.dropout, cfg.use_rslora)
        lora.reset_lora_parameters(generator)
        setattr(parent, child, lora)
    return targets


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
    """The base model alone inside the block (e.g. to generate training data), whatever adapter is loaded."""
    layers = list(lora_modules(model).values())
    for m in layers:
        m.unmerge()
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


def trainable_summary(model: nn.Module) -> str:
    """The line users know from PEFT's print_trainable_parameters()."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
