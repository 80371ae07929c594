"""RMSNorm, rotary embedding (q and k) and SwiGLU: the PyTorch references (gradcheck, and bit-identical to the model's
code before the kernels), the fused Triton kernels held against them, the dispatchers, and the tiny model run with
the kernels against the reference path.

Without CUDA the kernels run through Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton
is imported; the line below does the same when this file runs alone). Shapes are small: the interpreter is slow.
"""

import os
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lora_mem.kernels import lora_linear as lora_linear_module  # noqa: E402
from lora_mem.kernels import rms_norm as rms_norm_module  # noqa: E402
from lora_mem.kernels import rope as rope_module  # noqa: E402
from lora_mem.kernels import swiglu as swiglu_module  # noqa: E402
from lora_mem.kernels.lora_linear import HAS_TRITON  # noqa: E402
from lora_mem.kernels.policy import KernelPolicy  # noqa: E402
from lora_mem.kernels.rms_norm import rms_norm, rms_norm_reference, rms_norm_triton  # noqa: E402
from lora_mem.kernels.rope import apply_rotary_qk, apply_rotary_qk_reference, apply_rotary_qk_triton  # noqa: E402
from lora_mem.kernels.swiglu import swiglu, swiglu_reference, swiglu_triton  # noqa: E402
from tests.kernel_testing import DEVICE, requires_kernels  # noqa: E402

# (dtype, atol, rtol) against the reference evaluated in float64 on the same (already rounded) inputs, so only
# rounding counts. atol is relative to each tensor's largest entry (for RMSNorm's reductions). The kernels compute in
# fp32 and round once; the references in bf16/fp16 round after each operation. Every tolerance is one the reference
# itself meets in the same dtype (`check` asserts it), so a kernel passes by being about as accurate as the model's
# own code; measured on these shapes, the worst excess over rtol was 2.2e-3 (bf16) and 4e-4 (fp16) of the largest
# entry, for the reference's weight gradient. bf16's rtol is 2 ulp (2^-6): the interpreter's fp32 -> bf16 cast
# truncates (up to 1 ulp) where the GPU rounds to nearest, and RMSNorm rounds twice (n, then w * n).
DTYPE_TOLERANCES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 4e-3, 1.6e-2, id="bf16"),
    pytest.param(torch.float16, 1e-3, 2e-3, id="fp16"),
]
EPS = 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def randn(*shape, seed, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale + shift


def run(fn, inputs: dict, grad_out, dtype, device=DEVICE, needs_grad=None):
    """fn(**inputs) in ``dtype`` on ``device`` and its backward against ``grad_out`` (a tensor or tuple of tensors).
    Returns [outputs..., grads of the inputs in ``needs_grad`` order] in float64 on the CPU."""
    needs_grad = list(inputs) if needs_grad is None else needs_grad
    cast = {}
    for name, t in inputs.items():
        cast[name] = t.to(device=device, dtype=dtype).clone().requires_grad_(name in needs_grad)
    out = fn(**cast)
    outs = out if isinstance(out, tuple) else (out,)
    grads = grad_out if isinstance(grad_out, tuple) else (grad_out,)
    torch.autograd.backward(outs, [g.to(device=device, dtype=o.dtype) for g, o in zip(grads, outs)])
    return [t.detach().double().cpu() for t in outs] + [cast[n].grad.double().cpu() for n in needs_grad]


def check(kernel_fn, reference_fn, inputs, grad_out, dtype, atol, rtol, needs_grad=None, names=None):
    """Kernel in ``dtype`` vs the reference in float64 on the rounded inputs; the reference in ``dtype`` must meet the
    same tolerance (it calibrates it). Returns the kernel's results."""
    rounded = {k: v.to(dtype).double() for k, v in inputs.items()}
    grad64 = tuple(g.to(dtype).double() for g in (grad_out if isinstance(grad_out, tuple) else (grad_out,)))
    expected = run(reference_fn, rounded, grad64, torch.float64, device="cpu", needs_grad=needs_grad)
    got = run(kernel_fn, inputs, grad_out, dtype, needs_grad=needs_grad)
    ref_same_dtype = run(reference_fn, inputs, grad_out, dtype, device="cpu", needs_grad=needs_grad)
    names = names or [f"result {i}" for i in range(len(expected))]
    assert len(got) == len(expected) == len(names)
    for label, results in (("kernel", got), ("reference in the same dtype", ref_same_dtype)):
        for name, g, e in zip(names, results, expected):
            assert g.shape == e.shape, f"{label} {name}: shape {tuple(g.shape)} != {tuple(e.shape)}"
            scale = e.abs().max().item()
            torch.testing.assert_close(g, e, atol=atol * scale, rtol=rtol,
                                       msg=lambda m, n=name, lab=label: f"{lab}, {n}: {m}")
    return got


# ---------------------------------------------------------------------------------------------------------------------
# The references: gradcheck in float64
# ---------------------------------------------------------------------------------------------------------------------


def test_rms_norm_reference_gradcheck():
    x = randn(2, 3, 7, seed=0).double().requires_grad_()
    w = randn(7, seed=1, scale=0.2, shift=1.0).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: rms_norm_reference(x, w, 1e-5), (x, w))


def test_rope_reference_gradcheck():
    q = randn(2, 3, 4, 6, seed=0).double().requires_grad_()
    k = randn(2, 1, 4, 6, seed=1).double().requires_grad_()
    cos = randn(2, 4, 6, seed=2).double().requires_grad_()
    sin = randn(2, 4, 6, seed=3).double().requires_grad_()
    assert torch.autograd.gradcheck(apply_rotary_qk_reference, (q, k, cos, sin))


def test_swiglu_reference_gradcheck():
    g = randn(3, 5, seed=0, scale=3.0).double().requires_grad_()
    u = randn(3, 5, seed=1).double().requires_grad_()
    assert torch.autograd.gradcheck(swiglu_reference, (g, u))


# ---------------------------------------------------------------------------------------------------------------------
# The CPU default is the model's former code, bit for bit
# ---------------------------------------------------------------------------------------------------------------------
# Verbatim copies of model/qwen2.py before the kernels (RMSNorm.forward, rotate_half, apply_rotary, MLP.forward).


def pre_change_rms_norm_forward(self, x, policy=None):  # the policy the model now hands every norm: unused
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
    return self.weight * x.to(dtype)


def pre_change_rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def pre_change_apply_rotary(x, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + pre_change_rotate_half(x) * sin


def pre_change_mlp_forward(self, x, policy=None, rows=None):  # the model's policy and rows: unused (plain layers)
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _spy(monkeypatch, module, triton_name, reference_name):
    calls = []
    real_triton, real_reference = getattr(module, triton_name), getattr(module, reference_name)
    monkeypatch.setattr(module, triton_name, lambda *a, **k: calls.append("triton") or real_triton(*a, **k))
    monkeypatch.setattr(module, reference_name, lambda *a, **k: calls.append("reference") or real_reference(*a, **k))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cpu_default_ops_are_bit_identical_to_pre_change_code(monkeypatch, dtype):
    """On CPU tensors with the default kernel policy, the model's three ops take the references, which equal the
    former code exactly, outputs and gradients."""
    from lora_mem.model.qwen2 import MLP, RMSNorm, apply_rotary

    spies = [_spy(monkeypatch, rms_norm_module, "rms_norm_triton", "rms_norm_reference"),
             _spy(monkeypatch, rope_module, "apply_rotary_qk_triton", "apply_rotary_qk_reference"),
             _spy(monkeypatch, swiglu_module, "swiglu_triton", "swiglu_reference")]

    def both(fn, *tensors, module=None):
        """Outputs, the gradients of the tensors and of the module's parameters (upstream gradient 0.5)."""
        if module is not None:
            module.zero_grad(set_to_none=True)
        leaves = [t.clone().requires_grad_() for t in tensors]
        out = fn(*leaves)
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(out, [torch.ones_like(o) * 0.5 for o in out])
        params = [p.grad.clone() for p in module.parameters()] if module is not None else []
        return [o.detach() for o in out] + [leaf.grad for leaf in leaves] + params

    norm = RMSNorm(576, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(randn(576, seed=0, scale=0.1, shift=1.0))
    x = randn(2, 3, 576, seed=1, scale=3.0).to(dtype)
    q, k = randn(2, 9, 5, 64, seed=2).to(dtype), randn(2, 3, 5, 64, seed=3).to(dtype)
    cos, sin = randn(2, 5, 64, seed=4).to(dtype), randn(2, 5, 64, seed=5).to(dtype)
    mlp = MLP(SimpleNamespace(hidden_size=24, intermediate_size=40)).to(dtype)  # MLP reads only these two fields
    h = randn(2, 3, 24, seed=6).to(dtype)

    # In 16 bits a norm that needs a gradient has its backward written out (RMSNormNarrowBackward, its own test
    # below): its output stays the former code's; in fp32 its gradients too.
    norm_pair = (both(norm, x, module=norm), both(lambda x: pre_change_rms_norm_forward(norm, x), x, module=norm))
    if dtype != torch.float32:
        norm_pair = (norm_pair[0][:1], norm_pair[1][:1])
    pairs = [
        norm_pair,
        (both(lambda q, k: apply_rotary_qk(q, k, cos, sin), q, k),
         both(lambda q, k: (pre_change_apply_rotary(q, cos, sin), pre_change_apply_rotary(k, cos, sin)), q, k)),
        (both(lambda q: apply_rotary(q, cos, sin), q), both(lambda q: pre_change_apply_rotary(q, cos, sin), q)),
        (both(mlp, h, module=mlp), both(lambda h: pre_change_mlp_forward(mlp, h), h, module=mlp)),
    ]
    for now, before in pairs:
        assert len(now) == len(before) >= (1 if now is norm_pair[0] else 2)
        for a, b in zip(now, before):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert [calls for calls in spies] == [["reference"] if dtype == torch.float32 else [], ["reference"], ["reference"]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rms_norm_narrow_backward(dtype):
    """16-bit RMSNorm with a gradient takes the written-out backward: the reference's output bit for bit, and x and
    weight gradients as close to an fp64 reference (of the same 16-bit inputs) as autograd's through the reference."""
    x = randn(4, 5, 576, seed=1, scale=3.0).to(dtype)
    w = randn(576, seed=0, scale=0.1, shift=1.0).to(dtype)
    dy = randn(4, 5, 576, seed=2).to(dtype)

    def grads(fn, cast):
        xl, wl = x.to(cast, copy=True).requires_grad_(), w.to(cast, copy=True).requires_grad_()
        y = fn(xl, wl, 1e-5)
        y.backward(dy.to(cast))
        return y.detach(), xl.grad.double(), wl.grad.double()

    exact = grads(rms_norm_reference, torch.float64)
    autograd = grads(rms_norm_reference, dtype)
    written = grads(lambda x, w, eps: rms_norm(x, w, eps), dtype)
    assert torch.equal(written[0], autograd[0])
    for i in (1, 2):  # the x and weight gradients
        err_written = (written[i] - exact[i]).norm() / exact[i].norm()
        err_autograd = (autograd[i] - exact[i]).norm() / exact[i].norm()
        assert err_written < 1e-2 and err_written <= 1.5 * err_autograd, (i, err_written, err_autograd)
    assert not torch.equal(written[1], autograd[1])  # the other path did run


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from tests.tiny_models import make_tiny_checkpoint

    dirs = {}
    for kind in ("qwen2", "llama"):
        dirs[kind] = tmp_path_factory.mktemp(f"fused-{kind}")
        make_tiny_checkpoint(dirs[kind], kind)
    return dirs


def tiny_lora_model(ckpt_dir, device="cpu", dtype=None):
    """The tiny checkpoint with rank-4 LoRA on every linear layer and a non-zero (trained-looking) B."""
    from lora_mem.lora_core.inject import LoRAConfig, inject_lora, lora_modules
    from lora_mem.model.loader import load_model

    model = load_model(str(ckpt_dir), device=device, dtype=dtype).model
    inject_lora(model, LoRAConfig(rank=4, alpha=8), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    return model


def logits_and_lora_grads(model, ids):
    logits = model(ids)
    (logits.float().logsumexp(-1).mean() - logits.float()[..., 7].mean()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cpu_default_model_is_bit_identical_to_pre_change_model(monkeypatch, tiny_dirs, dtype):
    """The whole tiny model with LoRA (default path, CPU): logits and every LoRA gradient equal, bit for bit, to the
    model running the former code for RMSNorm, rope and the MLP; in bf16 the gradients within rounding (the norms'
    backward is written out there, tests above)."""
    from lora_mem.model import qwen2

    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(2))
    model = tiny_lora_model(tiny_dirs["qwen2"], dtype=dtype)
    now = logits_and_lora_grads(model, ids)
    with monkeypatch.context() as m:
        m.setattr(qwen2.RMSNorm, "forward", pre_change_rms_norm_forward)
        m.setattr(qwen2.MLP, "forward", pre_change_mlp_forward)
        m.setattr(qwen2, "apply_rotary_qk", lambda q, k, cos, sin, policy=None: (
            pre_change_apply_rotary(q, cos, sin), pre_change_apply_rotary(k, cos, sin)))
        before = logits_and_lora_grads(model, ids)
    assert torch.equal(now[0], before[0])
    assert len(now[1]) == 28 and now[1].keys() == before[1].keys()
    for name, g in now[1].items():
        if dtype == "fp32":
            assert torch.equal(g, before[1][name]), name
        else:
            assert (g.double() - before[1][name].double()).norm() <= 2e-2 * before[1][name].double().norm(), name


# ---------------------------------------------------------------------------------------------------------------------
# Kernels against the references
# ---------------------------------------------------------------------------------------------------------------------

# (leading shape, hidden): SmolLM2's 576, the tiny model's 64, small odd sizes, 2-D to 4-D inputs.
RMS_SHAPES = [
    pytest.param((7,), 576, id="7x576"),
    pytest.param((2, 3), 64, id="2x3x64"),
    pytest.param((2, 2, 3), 100, id="2x2x3x100"),
    pytest.param((5,), 24, id="5x24"),
]


@requires_kernels
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("leading,hidden", RMS_SHAPES)
def test_rms_norm_kernel_matches_reference(leading, hidden, dtype, atol, rtol):
    inputs = {"x": randn(*leading, hidden, seed=0, scale=2.0, shift=0.3),
              "weight": randn(hidden, seed=1, scale=0.3, shift=1.0)}
    dy = randn(*leading, hidden, seed=2)
    check(lambda x, weight: rms_norm_triton(x, weight, EPS), lambda x, weight: rms_norm_reference(x, weight, EPS),
          inputs, dy, dtype, atol, rtol, names=["y", "dx", "dweight"])


@requires_kernels
def test_rms_norm_kernel_small_rows_where_eps_matters():
    """Rows with mean(x^2) ~ eps: eps visibly changes the result (checked), and the kernel applies it as the
    reference does."""
    inputs = {"x": randn(6, 48, seed=0, scale=3e-3), "weight": randn(48, seed=1, scale=0.3, shift=1.0)}
    dy = randn(6, 48, seed=2)
    check(lambda x, weight: rms_norm_triton(x, weight, 1e-5), lambda x, weight: rms_norm_reference(x, weight, 1e-5),
          inputs, dy, torch.float32, 1e-5, 1e-5)
    no_eps = rms_norm_reference(inputs["x"], inputs["weight"], 0.0)
    assert (no_eps - rms_norm_reference(inputs["x"], inputs["weight"], 1e-5)).abs().max() > 0.1 * no_eps.abs().max()


@requires_kernels
@pytest.mark.parametrize("needs_grad", [["x"], ["weight"]], ids=["frozen-weight", "weight-only"])
def test_rms_norm_kernel_partial_grads(needs_grad):
    """Frozen norm weights (LoRA training) and a weight-only gradient take the other branches of the backward."""
    inputs = {"x": randn(3, 4, 40, seed=0), "weight": randn(40, seed=1, scale=0.3, shift=1.0)}
    check(lambda x, weight: rms_norm_triton(x, weight, EPS), lambda x, weight: rms_norm_reference(x, weight, EPS),
          inputs, randn(3, 4, 40, seed=2), torch.float32, 1e-5, 1e-5, needs_grad=needs_grad)


@requires_kernels
def test_rms_norm_kernel_mixed_dtypes_and_strided_input():
    """A bf16 input with an fp32 weight gives an fp32 output, as in the reference; a transposed (non-contiguous)
    input and a stride-0 upstream gradient need no copies from the caller."""
    x = randn(6, 5, 24, seed=0).to(torch.bfloat16).transpose(0, 1)  # (5, 6, 24), rows not evenly strided
    w = randn(24, seed=1, scale=0.3, shift=1.0)
    results = []
    for fn in (rms_norm_triton, rms_norm_reference):
        xx, ww = x.to(DEVICE).detach().requires_grad_(), w.to(DEVICE).requires_grad_()
        y = fn(xx, ww, EPS)
        y.sum().backward()
        results.append((y, xx.grad, ww.grad))
    for got, expected in zip(*results):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got.float().cpu(), expected.float().cpu(), atol=2e-2, rtol=2e-2)
    assert results[0][0].dtype == torch.float32 and results[0][1].dtype == torch.bfloat16


# (B, H, Hkv, T, D): SmolLM2's 9/3 heads of 64, the tiny model's 4/2 heads of 16, a head_dim whose half (12) is not
# a power of two, decoding (T = 1), MHA (H = Hkv).
ROPE_SHAPES = [
    pytest.param(2, 9, 3, 5, 64, id="smollm2-heads"),
    pytest.param(1, 4, 2, 7, 16, id="tiny-model"),
    pytest.param(2, 3, 1, 3, 24, id="d24"),
    pytest.param(3, 2, 2, 1, 32, id="decode"),
]


def rope_inputs(B, H, Hkv, T, D, seed=0):
    return {"q": randn(B, H, T, D, seed=seed), "k": randn(B, Hkv, T, D, seed=seed + 1),
            "cos": randn(B, T, D, seed=seed + 2), "sin": randn(B, T, D, seed=seed + 3)}


def model_layout(t):
    """(B, H, T, D) stored as (B, T, H, D): how q_proj(x).view(B, T, H, D).transpose(1, 2) lays it out."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


@requires_kernels
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("B,H,Hkv,T,D", ROPE_SHAPES)
def test_rope_kernel_matches_reference(B, H, Hkv, T, D, dtype, atol, rtol):
    """Random cos/sin (halves differing), so every term of the rotation is checked, not just the model's tables."""
    inputs = rope_inputs(B, H, Hkv, T, D)
    grads = (randn(B, H, T, D, seed=10), randn(B, Hkv, T, D, seed=11))

    def kernel(q, k, cos, sin):  # the model's layout of q and k
        return apply_rotary_qk_triton(model_layout(q), model_layout(k), cos, sin)

    got = check(kernel, apply_rotary_qk_reference, inputs, grads, dtype, atol, rtol, needs_grad=["q", "k"],
                names=["q_rot", "k_rot", "dq", "dk"])
    assert got[0].shape == (B, H, T, D) and got[1].shape == (B, Hkv, T, D)


@requires_kernels
@pytest.mark.parametrize("table_shape", ["B,T,D", "1,T,D", "T,D"])
def test_rope_kernel_model_tables_and_broadcast(table_shape):
    """The model's own cos/sin tables (RotaryEmbedding) for arbitrary positions, broadcast over the batch or not, on
    contiguous (B, H, T, D) inputs."""
    from lora_mem.model.qwen2 import RotaryEmbedding

    B, H, Hkv, T, D = 2, 4, 2, 6, 16
    positions = torch.tensor([[3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5]])
    if table_shape != "B,T,D":
        positions = positions[:1]
    cos, sin = RotaryEmbedding(D, 10000.0)(positions, torch.float32)  # (B or 1, T, D)
    if table_shape == "T,D":
        cos, sin = cos[0], sin[0]
    inputs = {"q": randn(B, H, T, D, seed=0), "k": randn(B, Hkv, T, D, seed=1)}
    grads = (randn(B, H, T, D, seed=2), randn(B, Hkv, T, D, seed=3))
    cos_d, sin_d = cos.to(DEVICE), sin.to(DEVICE)
    got = run(lambda q, k: apply_rotary_qk_triton(q, k, cos_d, sin_d), inputs, grads, torch.float32)
    cos_r, sin_r = (cos, sin) if table_shape != "T,D" else (cos[None], sin[None])  # the reference wants 3-D tables
    expected = run(lambda q, k: apply_rotary_qk_reference(q, k, cos_r, sin_r), inputs, grads, torch.float32,
                   device="cpu")
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


# (shape of gate and up): 2-D to 4-D, odd sizes; under the interpreter 256 elements a program, so most span several
# programs with a ragged tail.
SWIGLU_SHAPES = [
    pytest.param((3, 7, 96), id="3x7x96"),
    pytest.param((5, 1536), id="5x1536"),
    pytest.param((2, 3, 4, 37), id="2x3x4x37"),
    pytest.param((1, 1, 5), id="1x1x5"),
]


@requires_kernels
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES)
def test_swiglu_kernel_matches_reference(shape, dtype, atol, rtol):
    inputs = {"gate": randn(*shape, seed=0, scale=3.0), "up": randn(*shape, seed=1)}
    check(swiglu_triton, swiglu_reference, inputs, randn(*shape, seed=2), dtype, atol, rtol,
          names=["y", "dgate", "dup"])


@requires_kernels
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy, under the interpreter
def test_swiglu_kernel_extreme_gates_and_strided_inputs():
    """Gates far in both tails (exp overflows to inf for g << 0: silu -> -0, no NaN) and transposed inputs."""
    gate = torch.tensor([[-200.0, -90.0, -20.0, -1.0, 0.0, 1.0, 20.0, 90.0, 200.0]] * 2).t()  # (9, 2), strided
    up = randn(2, 9, seed=0).t()
    results = []
    for fn in (swiglu_triton, swiglu_reference):
        g, u = gate.to(DEVICE).requires_grad_(), up.to(DEVICE).requires_grad_()
        y = fn(g, u)
        y.backward(torch.ones_like(y))
        results.append([t.detach().cpu() for t in (y, g.grad, u.grad)])
    for got, expected in zip(*results):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@requires_kernels
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES)
def test_tolerances_can_fail(dtype, atol, rtol):
    """A 3 % error in any one op (the output scale, the sine, the gate) must trip the tolerances used above."""
    x = {"x": randn(4, 64, seed=0), "weight": randn(64, seed=1, scale=0.3, shift=1.0)}
    with pytest.raises(AssertionError):
        check(lambda x, weight: rms_norm_triton(x, weight, EPS) * 1.03,
              lambda x, weight: rms_norm_reference(x, weight, EPS), x, randn(4, 64, seed=2), dtype, atol, rtol)
    r = rope_inputs(1, 2, 1, 3, 16)
    with pytest.raises(AssertionError):
        check(lambda q, k, cos, sin: apply_rotary_qk_triton(q, k, cos, sin * 1.03), apply_rotary_qk_reference, r,
              (randn(1, 2, 3, 16, seed=9), randn(1, 1, 3, 16, seed=8)), dtype, atol, rtol, needs_grad=["q", "k"])
    s = {"gate": randn(4, 64, seed=0, scale=3.0), "up": randn(4, 64, seed=1)}
    with pytest.raises(AssertionError):
        check(lambda gate, up: swiglu_triton(gate * 1.03, up), swiglu_reference, s, randn(4, 64, seed=2), dtype,
              atol, rtol)


@requires_kernels
def test_second_backward_and_saved_tensors():
    """Nothing is written into saved tensors (a second backward through the same graph doubles the gradients), and
    the Functions save their inputs (views) and RMSNorm's per-row 1/rms, never an output-sized tensor."""
    x = randn(2, 5, 40, seed=0).to(DEVICE).requires_grad_()
    w = randn(40, seed=1, scale=0.3, shift=1.0).to(DEVICE).requires_grad_()
    gate, up = randn(2, 5, 40, seed=2).to(DEVICE).requires_grad_(), randn(2, 5, 40, seed=3).to(DEVICE).requires_grad_()
    q = randn(2, 4, 5, 16, seed=4).to(DEVICE).requires_grad_()
    k = randn(2, 2, 5, 16, seed=5).to(DEVICE).requires_grad_()
    cos, sin = randn(2, 5, 16, seed=6).to(DEVICE), randn(2, 5, 16, seed=7).to(DEVICE)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = rms_norm_triton(x, w, EPS)
        s = swiglu_triton(gate, up)
        qr, kr = apply_rotary_qk_triton(q, k, cos, sin)
    assert sorted(tuple(t.shape) for t in saved) == sorted(
        [(10, 40), (40,), (10,), (2, 5, 40), (2, 5, 40), (2, 5, 16), (2, 5, 16)])
    assert all(t.data_ptr() not in (y.data_ptr(), s.data_ptr(), qr.data_ptr(), kr.data_ptr()) for t in saved)
    assert any(t.data_ptr() == x.data_ptr() for t in saved) and any(t.data_ptr() == gate.data_ptr() for t in saved)

    loss = (y * y).sum() + (s * s).sum() + (qr * qr).sum() + (kr * kr).sum()
    leaves = (x, w, gate, up, q, k)
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in leaves]
    loss.backward()
    for t, g in zip(leaves, first):
        torch.testing.assert_close(t.grad, 2 * g)


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------------


def test_dispatch_cpu_default_and_forced_reference(monkeypatch):
    spies = [_spy(monkeypatch, rms_norm_module, "rms_norm_triton", "rms_norm_reference"),
             _spy(monkeypatch, rope_module, "apply_rotary_qk_triton", "apply_rotary_qk_reference"),
             _spy(monkeypatch, swiglu_module, "swiglu_triton", "swiglu_reference")]
    r = rope_inputs(1, 2, 1, 3, 8)
    for policy in (KernelPolicy(), KernelPolicy(kernels="reference", fused_ops=True)):
        rms_norm(torch.randn(3, 8), torch.ones(8), EPS, policy)
        apply_rotary_qk(r["q"], r["k"], r["cos"], r["sin"], policy)
        swiglu(torch.randn(3, 8), torch.randn(3, 8), policy)
    assert spies == [["reference"] * 2] * 3


@requires_kernels
def test_dispatch_triton_mode_and_unsupported_inputs(monkeypatch):
    """A policy with kernels="triton" and the fused ops sends supported CPU tensors to the kernels (interpreter); inputs
    outside the kernels' contract (fp64, odd head_dim, cos/sin requiring grad, mixed shapes) still take the
    reference."""
    policy = KernelPolicy(kernels="triton", fused_ops=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spies = [_spy(monkeypatch, rms_norm_module, "rms_norm_triton", "rms_norm_reference"),
             _spy(monkeypatch, rope_module, "apply_rotary_qk_triton", "apply_rotary_qk_reference"),
             _spy(monkeypatch, swiglu_module, "swiglu_triton", "swiglu_reference")]
    r = {k: v.to(DEVICE) for k, v in rope_inputs(1, 2, 1, 3, 8).items()}
    x, g = torch.randn(3, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE)
    rms_norm(x, torch.ones(8, device=DEVICE), EPS, policy)
    apply_rotary_qk(r["q"], r["k"], r["cos"], r["sin"], policy)
    swiglu(x, g, policy)
    assert spies == [["triton"]] * 3
    for calls in spies:
        calls.clear()
    rms_norm(x.double(), torch.ones(8, device=DEVICE, dtype=torch.float64), EPS, policy)
    apply_rotary_qk(r["q"][..., :7], r["k"][..., :7], r["cos"][..., :7], r["sin"][..., :7], policy)  # odd head_dim
    apply_rotary_qk(r["q"], r["k"], r["cos"].requires_grad_(), r["sin"], policy)
    swiglu(x, g[:, :1], policy)  # broadcast up: the reference handles it, the kernel does not
    assert spies == [["reference"], ["reference", "reference"], ["reference"]]


# ---------------------------------------------------------------------------------------------------------------------
# The model with the kernels
# ---------------------------------------------------------------------------------------------------------------------


@requires_kernels
@pytest.mark.parametrize("kind,lora_kernels", [("qwen2", False), ("llama", False), ("qwen2", True)],
                         ids=["qwen2", "llama", "qwen2-all-kernels"])
def test_model_with_kernels_matches_reference_path(monkeypatch, tiny_dirs, kind, lora_kernels):
    """The tiny model with LoRA, kernels="triton" and fused ops (the interpreter on CPU) against the reference path:
    logits and every LoRA gradient; RMSNorm, rope and SwiGLU must all actually run as kernels. Without
    ``lora_kernels`` the LoRA linear is held on its reference, which isolates the three new kernels; with it, every
    kernel of the model runs (the LoRA kernels also have their own model test in tests/test_lora.py)."""
    from lora_mem.kernels.lora_reference import lora_linear_reference
    from lora_mem.lora_core import lora as lora_module

    if not lora_kernels:
        monkeypatch.setattr(lora_module, "lora_linear", lambda *a, policy=None, **k: lora_linear_reference(*a, **k))
    model = tiny_lora_model(tiny_dirs[kind], device=DEVICE, dtype="fp32")
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    model.model.policy = KernelPolicy(kernels="reference")
    expected = logits_and_lora_grads(model, ids)
    model.model.policy = KernelPolicy(kernels="triton", fused_ops=True)
    spies = [_spy(monkeypatch, rms_norm_module, "rms_norm_triton", "rms_norm_reference"),
             _spy(monkeypatch, rope_module, "apply_rotary_qk_triton", "apply_rotary_qk_reference"),
             _spy(monkeypatch, swiglu_module, "swiglu_triton", "swiglu_reference")]
    lora_calls = _spy(monkeypatch, lora_linear_module, "lora_linear_triton", "lora_linear_reference")
    got = logits_and_lora_grads(model, ids)
    # 2 layers: 2 norms each + the final norm; one rope and one MLP per layer; 7 LoRA linears per layer.
    assert [len(c) for c in spies] == [5, 2, 2] and all(set(c) == {"triton"} for c in spies)
    assert lora_calls == (["triton"] * 14 if lora_kernels else [])
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    assert len(expected[1]) == 28 and got[1].keys() == expected[1].keys()
    for name, g in expected[1].items():
        assert g.abs().max() > 1e-6, f"{name}: zero gradient, the comparison would check nothing"
        torch.testing.assert_close(got[1][name], g, atol=1e-5 * g.abs().max().item(), rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_fused_ops_are_opt_in(monkeypatch):
    """Until they are timed on a GPU, the default (`auto`) never routes norms/RoPE/SwiGLU to the kernels."""
    x = torch.randn(2, 8)
    assert not KernelPolicy().use_fused_ops(x)
    assert not KernelPolicy.from_env({}).use_fused_ops(x)
    assert not KernelPolicy(fused_ops=True).use_fused_ops(x)  # CPU tensors need the interpreter and kernels="triton"
    assert not KernelPolicy.from_env({"LORA_MEM_FUSED_OPS": "1"}).use_fused_ops(x)
    assert not KernelPolicy(kernels="reference", fused_ops=True).use_fused_ops(x)
    if HAS_TRITON:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert not KernelPolicy(kernels="triton").use_fused_ops(x)  # the LoRA kernels alone
        assert KernelPolicy(kernels="triton", fused_ops=True).use_fused_ops(x)
        assert KernelPolicy.from_env({"LORA_MEM_KERNELS": "triton"}).use_fused_ops(x)
