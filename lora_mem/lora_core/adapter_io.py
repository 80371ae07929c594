"""Adapters on disk in PEFT's format, so they move freely between lora-mem and `peft`.

    adapter_config.json          {"peft_type": "LORA", "r", "lora_alpha", "target_modules", "use_rslora", ...}
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight  (r, in)
                                 base_model.model.<module>.lora_B.weight  (out, r)
Files are written to a temporary name and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from safetensors.torch import load_file, save_file
from torch import nn

from lora_mem.files import atomic_write_text
from lora_mem.kernels.lora_reference import lora_scaling
from lora_mem.lora_core.inject import LoRAConfig, inject_lora, is_target, lora_modules
from lora_mem.lora_core.lora import LoRALinear
from lora_mem.untrusted import read_json_as

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter that does not fit the model or is not a LoRA adapter; the message says why."""


def peft_config_dict(cfg: LoRAConfig, base_model: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "use_rslora": cfg.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
    }


def save_adapter(model: nn.Module, out_dir: str | Path, cfg: LoRAConfig, base_model: str) -> Path:
    """Write the model's LoRA weights and config in PEFT's format."""
    modules = lora_modules(model)
    if not modules:
        raise AdapterError("the model has no LoRA layers to save")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in modules.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()
    # save_file writes a path; write beside and rename for atomicity.
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{WEIGHTS_NAME}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, out_dir / WEIGHTS_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_text(out_dir / CONFIG_NAME, json.dumps(peft_config_dict(cfg, base_model), indent=2))
    return out_dir


class AdapterConfigFile(BaseModel):
    """The fields of a PEFT adapter_config.json that decide how an adapter is applied, with their types and ranges
    (PEFT's defaults where a field may be absent); the other fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")
    peft_type: str = "LORA"
    r: int = Field(ge=1)
    lora_alpha: float = Field(8.0, gt=0, allow_inf_nan=False)
    lora_dropout: float = Field(0.0, ge=0, lt=1, allow_inf_nan=False)
    use_rslora: bool = False
    target_modules: Any
    bias: str = "none"
    use_dora: bool | None = False
    rank_pattern: dict | None = None
    alpha_pattern: dict | None = None

    @field_validator("target_modules")
    @classmethod
    def module_names_or_regex(cls, targets: Any) -> list[str] | str:
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as e:
                raise ValueError(f"not a valid regular expression ({e})") from None
            return targets
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError("must be a non-empty list of module names or a regular expression string")
        return sorted(targets)

    @model_validator(mode="after")
    def supported(self) -> "AdapterConfigFile":
        if self.peft_type != "LORA":
            raise ValueError(f"peft_type '{self.peft_type}' is not LORA")
        if self.use_dora:
            raise ValueError("'use_dora' adapters are not supported")
        for key in ("rank_pattern", "alpha_pattern"):
            if getattr(self, key):
                raise ValueError(f"per-module '{key}' is not supported")
        if self.bias != "none":
            raise ValueError(f"bias='{self.bias}' is not supported (only 'none')")
        return self


def read_adapter_config(adapter_dir: Path) -> LoRAConfig:
    """The adapter's config, every field it uses checked (AdapterConfigFile)."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{adapter_dir}: no {CONFIG_NAME} (not a PEFT adapter directory)")
    raw = read_json_as(path, AdapterConfigFile, AdapterError)
    return LoRAConfig(rank=raw.r, alpha=raw.lora_alpha, dropout=raw.lora_dropout, use_rslora=raw.use_rslora,
                      target_modules=raw.target_modules)


def read_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """{module name: tensor} keyed as `<module>.lora_A` / `<module>.lora_B`; a tensor that is not a floating-point
    matrix, or that holds NaN or Inf, is an error naming it (such an adapter answers nothing)."""
    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterError(f"{adapter_dir}: no {WEIGHTS_NAME}")
    try:
        raw = load_file(path)
    except Exception as e:
        raise AdapterError(f"{path}: cannot be read ({e})") from e
    out = {}
    for key, t in raw.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        # PEFT may keep the adapter name in keys ("lora_A.default.weight"); drop it.
        name = name.replace(".lora_A.default.weight", ".lora_A").replace(".lora_B.default.weight", ".lora_B")
        name = name.replace(".lora_A.weight", ".lora_A").replace(".lora_B.weight", ".lora_B")
        if not name.endswith((".lora_A", ".lora_B")):
            raise AdapterError(f"{path}: tensor {key} is not a LoRA weight (lora_A or lora_B)")
        if not t.is_floating_point() or t.dim() != 2:
            raise AdapterError(f"{path}: {key} is a {t.dim()}-d {str(t.dtype).replace('torch.', '')} tensor, not a "
                               "floating-point matrix")
        if not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{path}: {key} has non-finite values (NaN or Inf): the adapter is unusable")
        out[name] = t
    return out


Layers = dict[str, tuple[int, int]]  # linear layer name -> (in_features, out_features)


def linear_layers(model: nn.Module) -> Layers:
    """{name: (in_features, out_features)} of every linear layer an adapter may adapt (never the LM head)."""
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, LoRALinear)) and not name.endswith("lm_head")}


def adapter_problems(cfg: LoRAConfig, weights: dict[str, torch.Tensor], layers: Layers) -> list[str]:
    """What keeps an adapter (its config and tensors) from fitting a model's linear `layers`: target modules that
    select nothing, tensors for modules it does not adapt or lacks, shapes that disagree with the rank or the layer."""
    problems = []
    targets = {name: shape for name, shape in layers.items() if is_target(name, cfg.target_modules)}
    entries = [cfg.target_modules] if isinstance(cfg.target_modules, str) else cfg.target_modules
    unmatched = [t for t in entries if not any(is_target(name, [t] if isinstance(cfg.target_modules, list) else t)
                                               for name in layers)]
    if unmatched:
        problems.append(f"target_modules {', '.join(map(repr, unmatched))} select no linear layer of the model "
                        "(an adapter adapts decoder projections, never lm_head)")
    file_modules = {k.rsplit(".", 1)[0] for k in weights}
    missing = sorted(f"{name}.{part}" for name in targets for part in ("lora_A", "lora_B")
                     if f"{name}.{part}" not in weights)
    lacks = sorted(file_modules - set(layers))
    untargeted = sorted(file_modules & set(layers) - set(targets))
    for what, names in (("weights missing from the file", missing),
                        ("weights for modules the model lacks", lacks),
                        ("weights for modules target_modules does not select", untargeted)):
        if names:
            problems.append(f"{what}: {', '.join(names[:8])}" + (" ..." if len(names) > 8 else ""))
    for name, (fan_in, fan_out) in targets.items():
        for part, shape in (("lora_A", (cfg.rank, fan_in)), ("lora_B", (fan_out, cfg.rank))):
            t = weights.get(f"{name}.{part}")
            if t is not None and tuple(t.shape) != shape:
                problems.append(f"{name}.{part}: file {list(t.shape)} vs model {list(shape)} "
                                f"(rank r={cfg.rank} in config; other base model?)")
    return problems


def raise_problems(adapter_dir: Path, problems: list[str]) -> None:
    if problems:
        more = f"; ... ({len(problems) - 6} more)" if len(problems) > 6 else ""
        raise AdapterError(f"{adapter_dir}: adapter does not fit the model: " + "; ".join(problems[:6]) + more)


def read_adapter(adapter_dir: str | Path, layers: Layers) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """An adapter's config and tensors, checked field by field and against a model's linear `layers`
    (`linear_layers(model)`, or those of a model not yet loaded): what every reader of adapters goes through."""
    adapter_dir = Path(adapter_dir)
    cfg, weights = read_adapter_config(adapter_dir), read_adapter_weights(adapter_dir)
    raise_problems(adapter_dir, adapter_problems(cfg, weights, layers))
    return cfg, weights


def load_adapter(model: nn.Module, adapter_dir: str | Path, generator=None) -> LoRAConfig:
    """Load a PEFT-format LoRA adapter into `model`, injecting LoRA layers first if it has none (a model that has
    them must have them on the adapter's modules, at its rank)."""
    adapter_dir = Path(adapter_dir)
    cfg, weights = read_adapter_config(adapter_dir), read_adapter_weights(adapter_dir)
    modules = lora_modules(model)
    problems = [f"{name}: model has rank {m.rank}, adapter config r={cfg.rank}"
                for name, m in modules.items() if m.rank != cfg.rank][:1]
    targets = {name for name in linear_layers(model) if is_target(name, cfg.target_modules)}
    if modules and set(modules) != targets:
        problems.append(f"the model's LoRA layers are on other modules than the adapter's target_modules "
                        f"{cfg.target_modules!r}")
    raise_problems(adapter_dir, problems + adapter_problems(cfg, weights, linear_layers(model)))
    if not modules:
        inject_lora(model, cfg, generator)
        modules = lora_modules(model)
    with torch.no_grad():
        for name, m in modules.items():
            m.unmerge()
            m.lora_A.copy_(weights[f"{name}.lora_A"])
            m.lora_B.copy_(weights[f"{name}.lora_B"])
            m.alpha, m.dropout, m.use_rslora = cfg.alpha, cfg.dropout, cfg.use_rslora
            m.scaling = lora_scaling(m.rank, cfg.alpha, cfg.use_rslora)
    return cfg
