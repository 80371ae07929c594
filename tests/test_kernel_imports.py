"""Where triton is not installed (it ships for Linux only), every kernel module still imports and each op takes its
PyTorch reference, even with a policy that asks for the kernels. Run in a child process whose `import triton` fails."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys
sys.modules["triton"] = None  # `import triton` raises ImportError from here on
import torch
import lora_mem  # the whole library, the front door
from lora_mem.kernels import _common, lora_linear, multi_lora_linear, rms_norm, rope, swiglu
from lora_mem.kernels.policy import KernelPolicy
from lora_mem.kernels.lora_reference import lora_linear_reference
from lora_mem.kernels.multi_lora_reference import multi_lora_linear_reference

assert not _common.HAS_TRITON and _common.triton.__name__ == "lora_mem.kernels._no_triton"
policy = KernelPolicy(kernels="triton", fused_ops=True)  # would take the kernels under the interpreter
g = torch.Generator().manual_seed(0)
x, w, b = torch.randn(6, 32, generator=g), torch.randn(16, 32, generator=g), torch.randn(16, generator=g)
A, B = torch.randn(4, 32, generator=g), torch.randn(16, 4, generator=g)
assert not policy.use_triton(x)
assert torch.equal(lora_linear.lora_linear(x, w, b, A, B, 2.0, policy=policy),
                   lora_linear_reference(x, w, b, A, B, 2.0))
ids = torch.tensor([0, 1, -1, 1, 0, 0])
with torch.no_grad():
    got = multi_lora_linear.multi_lora_linear(x, w, b, A[None].repeat(2, 1, 1), B[None].repeat(2, 1, 1),
                                              torch.tensor([1.0, 2.0]), ids, policy=policy)
    want = multi_lora_linear_reference(x, w, b, A[None].repeat(2, 1, 1), B[None].repeat(2, 1, 1),
                                       torch.tensor([1.0, 2.0]), ids)
assert torch.equal(got, want)
assert torch.equal(rms_norm.rms_norm(x, torch.ones(32), 1e-6, policy), rms_norm.rms_norm_reference(x, torch.ones(32), 1e-6))
assert torch.equal(swiglu.swiglu(x, x, policy), swiglu.swiglu_reference(x, x))
q, k, cos, sin = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8)
assert all(torch.equal(a, c) for a, c in zip(rope.apply_rotary_qk(q, k, cos, sin, policy),
                                             rope.apply_rotary_qk_reference(q, k, cos, sin)))
try:
    lora_linear.lora_linear_triton(x, w, b, A, B, 2.0)
    raise AssertionError("a kernel launched without triton")
except RuntimeError:
    pass
print("ok")
"""


def test_kernel_modules_import_and_fall_back_without_triton():
    child = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, capture_output=True, text=True, timeout=300,
                           env={"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"})
    assert child.returncode == 0, child.stderr
    assert child.stdout.splitlines()[-1] == "ok"
