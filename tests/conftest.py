"""Test-session setup. Triton reads TRITON_INTERPRET when it is first imported: without a GPU, set it
before anything imports triton, so the kernels can run through the interpreter in any test order.
(The dispatcher still sends CPU tensors to the PyTorch reference unless a kernel policy says kernels="triton".)

The tests run a CPU's fp32 path whatever CPU runs them: the kernel policy's bf16 default (on where the CPU has bf16
instructions) is off, for the command lines the tests start (LORA_MEM_CPU_BF16) and for the policies they build
(the CPU's instructions read as none). A test of the bf16 path asks for it."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LORA_MEM_CPU_BF16", "off")


@pytest.fixture(autouse=True)
def cpu_without_bf16(monkeypatch):
    import lora_mem.kernels.policy

    monkeypatch.setattr(lora_mem.kernels.policy, "cpu_bf16_instructions", lambda: ())


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny Llama checkpoint (tests/tiny_models.py) built once per session: tests read it and never change it."""
    from tests.tiny_models import make_tiny_checkpoint

    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_checkpoint(d, "llama")
    return d
