"""Adapters on disk in PEFT's format, so they move freely between lora-mem and `peft`.

    adapter_config.json          {"peft_type": "LORA", "r", "lora_alpha", "target_modules", "use_rslora", ...}
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight  (r, in)
                                 base_model.model.<module>.lora_B.weight  (out, r)
Files are written to a temporary name and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_mem.kernels.lora_reference import lora_scaling
from lora_mem.lora_core.inject import LoRAConfig, inject_lora, lora_modules, remove_lora

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter that does not fit the model or is not a LoRA adapter; the message says why."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


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


def read_adapter_config(adapter_dir: Path) -> LoRAConfig:
    path = adapter_dir / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{adapter_dir}: no {CONFIG_NAME} (not a PEFT adapter directory)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from e
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type '{raw.get('peft_type')}' is not LORA")
    for key in ("use_dora",):
        if raw.get(key):
            raise AdapterError(f"{path}: '{key}' adapters are not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if raw.get(key):
            raise AdapterError(f"{path}: per-module '{key}' is not supported")
    if raw.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias='{raw.get('bias')}' is not supported (only 'none')")
    if "r" not in raw:
        raise AdapterError(f"{path}: missing field 'r'")
    targets = raw.get("target_modules")
    if targets is None:
        raise AdapterError(f"{path}: missing field 'target_modules'")
    return LoRAConfig(
        rank=int(raw["r"]),
        alpha=float(raw.get("lora_alpha", 8)),
        dropout=float(raw.get("lora_dropout", 0.0)),
        use_rslora=bool(raw.get("use_rslora", False)),
        target_modules=sorted(targets) if isinstance(targets, list) else targets,
    )


def read_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """{module name: tensor} keyed as `<module>.lora_A` / `<module>.lora_B`; a tensor with NaN or Inf is an
    error naming it (such an adapter answers nothing)."""
    path = adapter_dir / WEIGHTS_NAME
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
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{path}: {key} has non-finite values (NaN or Inf): the adapter is unusable")
        out[name] = t
    return out


def load_adapter(model: nn.Module, adapter_dir: str | Path, generator=None) -> LoRAConfig:
    """Load a PEFT-format LoRA adapter into `model`, injecting LoRA layers first if it has none."""
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    weights = read_adapter_weights(adapter_dir)
    modules = lora_modules(model)
    injected = not modules
    if injected:
        inject_lora(model, cfg, generator)
        modules = lora_modules(model)
    problems = []
    for name, m in modules.items():
        if m.rank != cfg.rank:
            problems.append(f"{name}: model has rank {m.rank}, adapter config r={cfg.rank}")
    file_modules = {k.rsplit(".", 1)[0] for k in weights}
    missing = sorted(set(modules) - file_modules)
    unexpected = sorted(file_modules - set(modules))
    if missing:
        problems.append(f"modules without weights in the file: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"weights for modules the model lacks: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
    for name, m in modules.items():
        for part, param in (("lora_A", m.lora_A), ("lora_B", m.lora_B)):
            t = weights.get(f"{name}.{part}")
            if t is not None and tuple(t.shape) != tuple(param.shape):
                problems.append(f"{name}.{part}: file {list(t.shape)} vs model {list(param.shape)} "
                                f"(rank r={cfg.rank} in config; other base model?)")
    if problems:
        if injected:  # leave the model as it was: the wrapped layers go back to plain nn.Linear
            remove_lora(model, modules)
        more = f"; ... ({len(problems) - 6} more)" if len(problems) > 6 else ""
        raise AdapterError(f"{adapter_dir}: adapter does not fit the model: " + "; ".join(problems[:6]) + more)
    with torch.no_grad():
        for name, m in modules.items():
            m.unmerge()
            m.lora_A.copy_(weights[f"{name}.lora_A"])
            m.lora_B.copy_(weights[f"{name}.lora_B"])
            m.alpha, m.dropout, m.use_rslora = cfg.alpha, cfg.dropout, cfg.use_rslora
            m.scaling = lora_scaling(m.rank, cfg.alpha, cfg.use_rslora)
    return cfg
