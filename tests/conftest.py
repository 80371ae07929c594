"""Test-session setup. Triton reads TRITON_INTERPRET when it is first imported: without a GPU, set it
before anything imports triton, so the kernels can run through the interpreter in any test order.
(The dispatcher still sends CPU tensors to the PyTorch reference unless a kernel policy says kernels="triton".)"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny Llama checkpoint (tests/tiny_models.py) built once per session: tests read it and never change it."""
    from tests.tiny_models import make_tiny_checkpoint

    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_checkpoint(d, "llama")
    return d
