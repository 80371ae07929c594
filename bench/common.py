"""What every benchmark records: the machine, the versions, the command line; its run files, read and written."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from pathlib import Path

import torch
from pydantic import BaseModel

from lora_mem.kernels.cpu_allocator import keeps_freed_memory
from lora_mem.kernels.policy import KernelPolicy
from lora_mem.files import atomic_write_json, atomic_write_text  # noqa: F401  (the benchmarks write through here)
from lora_mem.untrusted import JSONFileError, read_json, read_json_lines, validated

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"  # every benchmark's and experiment's committed results


def cpu_details() -> dict:
    """What tells two hosts of one CPU name apart (a VM's "AMD EPYC" can be any generation): the family and model
    numbers, the clock, the vector extensions that set the fp32 GEMM rate."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "cpu MHz", "flags") and key not in fields:
                fields[key] = value.strip()
    except OSError:
        return {"name": platform.processor() or "unknown cpu"}
    flags = set(fields.get("flags", "").split())
    return {"name": fields.get("model name", "unknown cpu"), "family": fields.get("cpu family"),
            "model": fields.get("model"), "mhz": float(fields["cpu MHz"]) if "cpu MHz" in fields else None,
            "vector_extensions": sorted(f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"))}


def cpu_name() -> str:
    return cpu_details()["name"]


def device_description(device: torch.device) -> str:
    """What a results file says of the device: the GPU's name, or the CPU's with its cores and torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def name_slug(name: str) -> str:
    """A device name as a file-name tag: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_slug(device: torch.device) -> str:
    """Short file-name tag: `cpu`, or the GPU name (`nvidia-h100-80gb-hbm3`)."""
    if device.type != "cuda":
        return "cpu"
    return name_slug(torch.cuda.get_device_name(device))


def versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for mod in ("triton", "transformers", "peft", "tokenizers", "safetensors"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    return out


def git_commit() -> str | None:
    """The code a result came from (with '-dirty' when the work tree had changes)."""
    import subprocess

    root = REPO_ROOT
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("-dirty" if dirty else "")) or None


def run_info(device: torch.device, policy: KernelPolicy = KernelPolicy()) -> dict:
    return {
        "git_commit": git_commit(),
        "device": device_description(device),
        "device_type": device.type,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "versions": versions(),
        "loadavg_start": os.getloadavg(),
        "cpu": cpu_details(),
        "kernel_policy": policy.to_dict(),  # which kernels the run's model was built with
        # glibc's malloc tuned by load_model, which does it for CPU models only (cpu_allocator)
        "cpu_keeps_freed_memory": device.type == "cpu" and keeps_freed_memory(),
    }


def hf_config(c):
    """A `transformers` config of the same shapes as lora-mem's ModelConfig `c` (bench/test-only reference): for
    the randomly initialised presets (lora_mem.model.config.PRESETS), which have no checkpoint to load on the other side."""
    import transformers

    common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                  num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rope_theta=c.rope_theta,
                  rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
                  max_position_embeddings=c.max_position_embeddings)
    if c.model_type == "qwen2":  # q/k/v bias always, no o bias: what the preset says too
        if not c.qkv_bias or c.o_bias:
            raise ValueError(f"transformers' Qwen2 has q/k/v bias and no o bias; this config has "
                             f"qkv_bias={c.qkv_bias}, o_bias={c.o_bias}")
        return transformers.Qwen2Config(**common)
    return transformers.LlamaConfig(**common, attention_bias=c.qkv_bias)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_results_json(path: Path, what: str, error: type[Exception]) -> dict:
    """A results file another benchmark wrote; a missing or unreadable one raises `error` naming the file."""
    if not Path(path).is_file():
        raise error(f"{path}: not found (expected {what})")
    try:
        return read_json(path)
    except JSONFileError as e:
        raise error(f"{e} (expected {what})") from None


class RunConfigMismatch(ValueError):
    """--out holds a run whose result-bearing settings differ from this invocation's."""


class RunFileError(ValueError):
    """A file of an earlier invocation in --out that cannot be read."""


MOVE_IT_AWAY = "move it away (or use another --out) to redo what it recorded"


def read_run_file(path: Path, schema: type[BaseModel] | None = None) -> dict:
    """A JSON object that an earlier invocation wrote into --out, read strictly (lora_mem.untrusted) and, given a
    schema, checked field by field; anything else is a RunFileError naming the file and field."""
    try:
        value = read_json(path)
        if not isinstance(value, dict):
            raise JSONFileError(f"{path}: must be a JSON object, got {type(value).__name__}")
        if schema is not None:
            validated(value, schema, str(path))
    except JSONFileError as e:
        raise RunFileError(f"{e}; {MOVE_IT_AWAY}") from None
    return value


def check_or_write_run_config(out: Path, settings: dict, keys: tuple[str, ...], added_later: dict | None = None,
                              recorded_later: tuple[str, ...] = (), write: bool = True) -> None:
    """Refuse to resume `out` when a setting in `keys` differs from its run_config.json; write one if it has none.

    A run directory older than a setting resumes when that setting is off now: `added_later` maps the setting to
    the value the older runs had; for a setting recorded as a dict (the kernel policy), to the values of the keys
    its older records lack. `recorded_later` names settings older runs did not record at all (not checked)."""
    added_later = added_later or {}
    path = out / "run_config.json"
    if path.is_file():
        old = read_run_file(path)

        def saved(k):
            return old[k] if k in old else added_later.get(k)

        def agrees(k):
            if k not in old and k in recorded_later:
                return True
            if k not in old and k in added_later:  # it was off there: "off" or "not applicable" agree
                return settings.get(k) in (None, added_later[k])
            if isinstance(old.get(k), dict) and isinstance(added_later.get(k), dict):  # a record that gained keys
                return {**added_later[k], **old[k]} == settings.get(k)
            return old.get(k) == settings.get(k)

        diffs = [f"{k}: saved {saved(k)!r} vs now {settings.get(k)!r}" for k in keys if not agrees(k)]
        if diffs:
            raise RunConfigMismatch(f"{out} holds a run with other settings ({'; '.join(diffs)}): "
                                    "use another --out, or the same settings to resume")
    elif write:
        atomic_write_json(path, settings)


def read_jsonl(path: Path, schema: type[BaseModel] | None = None) -> list[dict]:
    """The rows of a JSON-lines file of a run, each a JSON object (checked against ``schema`` if given); a bad line
    is a RunFileError naming the file and line."""
    try:
        rows = read_json_lines(path)
        for i, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise JSONFileError(f"{path} row {i}: must be a JSON object, got {type(row).__name__}")
            if schema is not None:
                validated(row, schema, f"{path} row {i}")
    except JSONFileError as e:
        raise RunFileError(f"{e}; {MOVE_IT_AWAY}") from None
    return rows
