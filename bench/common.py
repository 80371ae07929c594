"""What every benchmark records: the machine, the versions, the command line; atomic JSON writes."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

from lora_core.adapter_io import atomic_write_text  # one atomic writer for the project


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device) -> str:
    """Short file-name tag: `cpu`, or the GPU name (`nvidia-h100-80gb-hbm3`)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


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

    root = Path(__file__).parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("-dirty" if dirty else "")) or None


def run_info(device: torch.device) -> dict:
    return {
        "git_commit": git_commit(),
        "device": device_name(device),
        "device_type": device.type,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "versions": versions(),
        "loadavg_start": os.getloadavg(),
    }


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
