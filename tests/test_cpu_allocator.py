"""glibc kept from unmapping freed memory (lora_mem/kernels/cpu_allocator.py): where it applies, the switch that turns
it off, the loader applying it for CPU models, and results files recording it."""

import os
import subprocess
import sys

import pytest
import torch

import lora_mem.model.loader as loader
from bench.common import run_info
from lora_mem.kernels import cpu_allocator
from lora_mem.kernels.cpu_allocator import keeps_freed_memory
from tests.tiny_models import make_tiny_checkpoint

GLIBC = cpu_allocator._glibc() is not None


def in_fresh_process(code: str, **env) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, **env})
    return result.stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_sets_both_thresholds_once_per_process():
    code = ("from lora_mem.kernels.cpu_allocator import keep_freed_memory as k; "
            "print(k(), k(), k.cache_info().misses)")
    assert in_fresh_process(code, LORA_MEM_CPU_KEEP_FREED="1") == "True True 1"


def test_the_variable_turns_it_off():
    code = "from lora_mem.kernels.cpu_allocator import keep_freed_memory as k; print(k())"
    assert in_fresh_process(code, LORA_MEM_CPU_KEEP_FREED="0") == "False"
    assert keeps_freed_memory({"LORA_MEM_CPU_KEEP_FREED": "0"}) is False
    assert keeps_freed_memory({}) is GLIBC  # unset: on wherever glibc is


def test_a_bad_value_names_the_variable():
    with pytest.raises(ValueError, match="LORA_MEM_CPU_KEEP_FREED"):
        keeps_freed_memory({"LORA_MEM_CPU_KEEP_FREED": "yes"})


def test_loading_a_cpu_model_applies_it(monkeypatch, tmp_path):
    make_tiny_checkpoint(tmp_path, "qwen2")
    calls = []
    monkeypatch.setattr(loader, "keep_freed_memory", lambda: calls.append(1))
    loader.load_model(str(tmp_path), device="cpu")
    assert calls == [1]


def test_results_files_record_it(monkeypatch):
    monkeypatch.setenv("LORA_MEM_CPU_KEEP_FREED", "0")
    assert run_info(torch.device("cpu"))["cpu_keeps_freed_memory"] is False
    monkeypatch.setenv("LORA_MEM_CPU_KEEP_FREED", "1")
    assert run_info(torch.device("cpu"))["cpu_keeps_freed_memory"] is GLIBC
