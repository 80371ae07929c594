"""Test-session setup. Triton reads TRITON_INTERPRET when it is first imported: without a GPU, set it
before anything imports triton, so the kernels can run through the interpreter in any test order.
(The dispatcher still sends CPU tensors to the PyTorch reference unless a kernel policy says kernels="triton".)"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
