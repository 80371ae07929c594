"""LoRA linear: the PyTorch reference (gradcheck) and the fused Triton kernels held against it.

Without CUDA the kernels run through Triton's CPU interpreter: TRITON_INTERPRET must be set before triton builds
the kernels, hence the environment line above the imports. Shapes are kept to tens of rows/columns so the
interpreter gets through the file in about a minute on two cores.
"""

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lora_mem.kernels import lora_linear as lora_linear_module  # noqa: E402
from lora_mem.kernels.lora_linear import (  # noqa: E402
    HAS_TRITON,
    LoRALinearFunction,
    lora_linear,
    lora_linear_triton,
)
from lora_mem.kernels.lora_reference import lora_linear_reference, lora_scaling  # noqa: E402
from lora_mem.kernels.policy import KernelPolicy  # noqa: E402
from tests.kernel_testing import DEVICE, assert_close_scaled, requires_kernels  # noqa: E402

# (dtype, atol, rtol) against a float64 reference evaluated on the same (already rounded) inputs, so only the
# kernel's own rounding counts (the thin s t and dt and every output are stored in the input dtype). atol is relative
# to the largest entry of each tensor: a reduction's rounding error scales with the size of its terms, not with the
# (possibly cancelled) entry. bf16 needs the most room under the interpreter, whose fp32 -> bf16 cast truncates where
# the GPU rounds to nearest (worst seen: 1e-2 of the largest entry; 5e-3 for torch's own bf16 path).
DTYPE_TOLERANCES = [
    pytest.param(torch.float32, 1e-4, 1e-4, id="fp32"),
    pytest.param(torch.bfloat16, 2e-2, 2e-2, id="bf16"),
    pytest.param(torch.float16, 5e-3, 5e-3, id="fp16"),
]
SCALING = 1.5


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def make_inputs(leading, in_features, out_features, rank, bias=True, seed=0):
    """Float32 CPU tensors with O(1) outputs: x, W, b, A, B and an upstream gradient dy."""
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(*leading, in_features, generator=g),
        "weight": torch.randn(out_features, in_features, generator=g) / math.sqrt(in_features),
        "bias": torch.randn(out_features, generator=g) if bias else None,
        # A non-zero B (a trained adapter), so the LoRA branch and its gradients are all exercised.
        "lora_A": torch.randn(rank, in_features, generator=g) / math.sqrt(in_features),
        "lora_B": torch.randn(out_features, rank, generator=g) / math.sqrt(rank),
        "dy": torch.randn(*leading, out_features, generator=g),
    }


def run(fn, inputs, dtype, *, scaling=SCALING, dropout_p=0.0, training=False, seed=123, device=DEVICE):
    """Forward + backward of ``fn`` in ``dtype``; returns (y, dx, dA, dB) in float64 on the CPU."""
    cast = {k: None if v is None else v.to(device=device, dtype=dtype).clone() for k, v in inputs.items()}
    x = cast["x"].requires_grad_()
    lora_A = cast["lora_A"].requires_grad_()
    lora_B = cast["lora_B"].requires_grad_()
    generator = torch.Generator(device=device).manual_seed(seed)
    y = fn(x, cast["weight"], cast["bias"], lora_A, lora_B, scaling,
           dropout_p=dropout_p, training=training, generator=generator)
    y.backward(cast["dy"])
    return tuple(t.detach().double().cpu() for t in (y, x.grad, lora_A.grad, lora_B.grad))


def reference64(inputs, dtype, **kwargs):
    """The reference in float64 on the inputs rounded to ``dtype`` first (the kernel sees exactly these values)."""
    rounded = {k: None if v is None else v.to(dtype).double() for k, v in inputs.items()}
    return run(lora_linear_reference, rounded, torch.float64, device="cpu", **kwargs)


def assert_all_close(got, expected, atol, rtol):
    """Output and gradients close, atol taken relative to each expected tensor's largest entry."""
    for name, g, e in zip(("y", "dx", "dA", "dB"), got, expected):
        assert_close_scaled(g, e, atol, rtol, name)


# ---------------------------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("leading", [(5,), (2, 3)], ids=["2d", "3d"])
def test_reference_gradcheck(bias, leading):
    inp = make_inputs(leading, 7, 6, 3, bias=bias)
    args = [inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"]]
    args = [None if a is None else a.double().requires_grad_() for a in args]

    def f(x, w, b, a, bb):
        return lora_linear_reference(x, w, b, a, bb, 0.7)

    assert torch.autograd.gradcheck(f, tuple(args))


def test_reference_gradcheck_dropout():
    inp = make_inputs((6,), 8, 5, 2)
    args = tuple(inp[k].double().requires_grad_() for k in ("x", "lora_A", "lora_B"))
    w, b = inp["weight"].double(), inp["bias"].double()

    def f(x, a, bb):  # a freshly seeded generator per call: the same mask on every gradcheck evaluation
        gen = torch.Generator().manual_seed(0)
        return lora_linear_reference(x, w, b, a, bb, 2.0, dropout_p=0.4, training=True, generator=gen)

    assert torch.autograd.gradcheck(f, args)


def test_reference_matches_dense_formula():
    inp = make_inputs((9,), 12, 10, 4)
    x, w, b, a, bb = (inp[k].double() for k in ("x", "weight", "bias", "lora_A", "lora_B"))
    dense = x @ (w + SCALING * bb @ a).T + b  # the merged-weight form
    torch.testing.assert_close(lora_linear_reference(x, w, b, a, bb, SCALING), dense)


@pytest.mark.parametrize("leading", [(), (5,), (2, 3), (2, 1, 4)], ids=["1d", "2d", "3d", "4d"])
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-6, 1e-6), (torch.bfloat16, 2e-2, 2e-2)],
                         ids=["fp32", "bf16"])
def test_reference_equals_unfused_form(leading, dtype, atol, rtol):
    """The reference adds s t B^T inside an addmm_ on the base output: same shape as the input's leading dims, and
    the numbers of the plain unfused form (base + s * (x A^T) B^T), to rounding."""
    inp = make_inputs(leading or (1,), 12, 10, 4)
    x, w, b, a, bb = (inp[k].to(dtype) for k in ("x", "weight", "bias", "lora_A", "lora_B"))
    if not leading:
        x = x[0]
    y = lora_linear_reference(x, w, b, a, bb, SCALING)
    unfused = torch.nn.functional.linear(x, w, b) + SCALING * ((x @ a.T) @ bb.T)
    assert y.shape == (*leading, 10) and y.dtype == dtype
    torch.testing.assert_close(y, unfused, atol=atol, rtol=rtol)


def test_lora_scaling():
    assert lora_scaling(8, 16) == 2.0
    assert lora_scaling(16, 8, use_rslora=True) == 2.0
    with pytest.raises(ValueError):
        lora_scaling(0, 8)


# ---------------------------------------------------------------------------------------------------------------------
# Kernels against the reference
# ---------------------------------------------------------------------------------------------------------------------

# (M, in, out, bias): odd and even sizes, none of them block multiples except 16; both bias settings.
SHAPES = [
    pytest.param(6, 16, 16, False, id="6x16->16"),
    pytest.param(6, 42, 123, True, id="6x42->123+b"),
    pytest.param(37, 123, 42, False, id="37x123->42"),
    pytest.param(37, 16, 123, True, id="37x16->123+b"),
]


@requires_kernels
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("rank", [1, 8, 16])
@pytest.mark.parametrize("M,in_features,out_features,bias", SHAPES)
def test_kernel_matches_reference(M, in_features, out_features, bias, rank, dtype, atol, rtol):
    inp = make_inputs((M,), in_features, out_features, rank, bias=bias)
    got = run(lora_linear_triton, inp, dtype)
    assert_all_close(got, reference64(inp, dtype), atol, rtol)


@requires_kernels
@pytest.mark.parametrize("rank", [48, 128])  # 48 pads to a 64-wide block; 128 is the largest supported rank
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES[:2])
def test_kernel_large_ranks(rank, dtype, atol, rtol):
    inp = make_inputs((21,), 40, 24, rank)
    assert_all_close(run(lora_linear_triton, inp, dtype), reference64(inp, dtype), atol, rtol)


@requires_kernels
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES[:2])
def test_kernel_leading_dims(dtype, atol, rtol):
    # (B, T, in) with B * T = 70 tokens: three reduction splits for dA and dB under the interpreter.
    inp = make_inputs((2, 35), 42, 24, 8)
    got = run(lora_linear_triton, inp, dtype)
    assert got[0].shape == (2, 35, 24) and got[1].shape == (2, 35, 42)
    assert_all_close(got, reference64(inp, dtype), atol, rtol)


@requires_kernels
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES[:2])
def test_tolerance_can_fail(dtype, atol, rtol):
    """A 10 % error in the LoRA branch must trip the tolerances used above."""
    inp = make_inputs((37,), 42, 16, 8)
    wrong = run(lora_linear_triton, inp, dtype, scaling=SCALING * 1.1)
    with pytest.raises(AssertionError):
        assert_all_close(wrong, reference64(inp, dtype), atol, rtol)


@requires_kernels
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES[:2])
def test_kernel_dropout_matches_reference(dtype, atol, rtol):
    """Both paths draw the keep-mask from the same generator state, so they agree exactly in distribution and mask."""
    inp = make_inputs((37,), 42, 24, 8)
    got = run(lora_linear_triton, inp, dtype, dropout_p=0.3, training=True, seed=7)
    assert_all_close(got, reference64(inp, dtype, dropout_p=0.3, training=True, seed=7), atol, rtol)
    # Dropout really acted (on y and on dx, whose LoRA term carries the mask) ...
    no_dropout = reference64(inp, dtype)
    assert (got[0] - no_dropout[0]).abs().max() > 10 * atol
    assert (got[1] - no_dropout[1]).abs().max() > 10 * atol
    # ... and evaluation mode ignores it.
    assert_all_close(run(lora_linear_triton, inp, dtype, dropout_p=0.3, training=False), no_dropout, atol, rtol)


@requires_kernels
def test_kernel_fp32_adapter_on_bf16_base():
    """fp32 A/B on a bf16 base (mixed-precision training): gradients come back in fp32, values match."""
    inp = make_inputs((37,), 42, 24, 8)
    base = {k: inp[k].to(DEVICE, torch.bfloat16) for k in ("x", "weight", "bias", "dy")}
    results = []
    for fn in (lora_linear_triton, lora_linear_reference):
        a = inp["lora_A"].to(DEVICE).requires_grad_()
        b = inp["lora_B"].to(DEVICE).requires_grad_()
        y = fn(base["x"], base["weight"], base["bias"], a, b, SCALING)
        y.backward(base["dy"])
        assert y.dtype == torch.bfloat16 and a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
        results.append((y.float(), a.grad, b.grad))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)


@requires_kernels
def test_kernel_strided_grad_and_double_backward_pass():
    """Stride-0 upstream gradients (from .sum()) work, and a second backward through the same graph gives the same
    gradients again (nothing was overwritten in place)."""
    inp = make_inputs((37,), 42, 24, 8)
    x = inp["x"].to(DEVICE).requires_grad_()
    a = inp["lora_A"].to(DEVICE).requires_grad_()
    b = inp["lora_B"].to(DEVICE).requires_grad_()
    w, bias = inp["weight"].to(DEVICE), inp["bias"].to(DEVICE)
    y = lora_linear_triton(x, w, bias, a, b, SCALING)
    y.sum().backward(retain_graph=True)
    first = [t.grad.clone() for t in (x, a, b)]
    y.sum().backward()
    for t, g in zip((x, a, b), first):
        torch.testing.assert_close(t.grad, 2 * g)

    ref = [t.detach().double().cpu().requires_grad_() for t in (x, a, b)]
    lora_linear_reference(ref[0], w.double().cpu(), bias.double().cpu(), ref[1], ref[2], SCALING).sum().backward()
    for g, r in zip(first, ref):
        torch.testing.assert_close(g.double().cpu(), r.grad, atol=1e-4, rtol=1e-4)


@requires_kernels
def test_kernel_saves_only_x_and_thin_t():
    """Autograd keeps x, the frozen weights and the thin t (M x r) for backward, never y (M x out)."""
    M, in_features, out_features, rank = 37, 42, 24, 8
    inp = make_inputs((M,), in_features, out_features, rank)
    x = inp["x"].to(DEVICE).requires_grad_()
    a = inp["lora_A"].to(DEVICE).requires_grad_()
    b = inp["lora_B"].to(DEVICE).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lora_linear_triton(x, inp["weight"].to(DEVICE), inp["bias"].to(DEVICE), a, b, SCALING)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(M, in_features), (out_features, in_features), (rank, in_features),
                             (out_features, rank), (M, rank)])
    assert y.shape == (M, out_features) and all(t.data_ptr() != y.data_ptr() for t in saved)
    assert any(t.data_ptr() == x.data_ptr() for t in saved)  # x itself, not a copy
    node = y.grad_fn  # a view of the Function's 2-D output
    while not node.name().startswith(LoRALinearFunction.__name__):
        node = node.next_functions[0][0]
    assert [tuple(t.shape) for t in node.saved_tensors if t is not None] == [  # None: no dropout mask
        (M, in_features), (out_features, in_features), (rank, in_features), (out_features, rank), (M, rank)]


@requires_kernels
def test_kernel_rejects_trainable_base_and_bad_rank():
    inp = make_inputs((6,), 16, 16, 4)
    w = inp["weight"].to(DEVICE).requires_grad_()
    with pytest.raises(ValueError, match="frozen"):
        lora_linear_triton(inp["x"].to(DEVICE), w, None, inp["lora_A"].to(DEVICE), inp["lora_B"].to(DEVICE), 1.0)
    big = make_inputs((6,), 16, 16, 129)
    with pytest.raises(ValueError, match="rank"):
        lora_linear_triton(*(big[k].to(DEVICE) for k in ("x", "weight", "bias", "lora_A", "lora_B")), 1.0)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_autotune_pruning_keeps_fitting_tiles():
    """GPU autotuning drops tiles far larger than the problem, and never drops every config."""
    configs = lora_linear_module.FUSED_CONFIGS
    few_tokens = lora_linear_module._prune_fused_configs(configs, {"M_BUCKET": 8, "N": 256})
    assert few_tokens and all(c.kwargs["BLOCK_M"] <= 64 for c in few_tokens)
    assert lora_linear_module._prune_fused_configs(configs, {"M_BUCKET": 16384, "N": 8960}) == configs
    thin = lora_linear_module._prune_thin_configs(lora_linear_module._THIN_CONFIGS, {"P_BUCKET": 1, "Q_BUCKET": 1})
    assert len(thin) >= 1


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------------


def _spy_paths(monkeypatch):
    calls = []
    real_triton, real_reference = lora_linear_module.lora_linear_triton, lora_linear_module.lora_linear_reference
    monkeypatch.setattr(lora_linear_module, "lora_linear_triton",
                        lambda *a, **k: calls.append("triton") or real_triton(*a, **k))
    monkeypatch.setattr(lora_linear_module, "lora_linear_reference",
                        lambda *a, **k: calls.append("reference") or real_reference(*a, **k))
    return calls


def test_dispatch_cpu_default_is_reference(monkeypatch):
    calls = _spy_paths(monkeypatch)
    inp = make_inputs((4,), 16, 8, 2)
    x = inp["x"]  # a CPU tensor
    assert not KernelPolicy().use_triton(x)
    lora_linear(x, inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], 1.0)
    assert calls == ["reference"]


def test_dispatch_reference_forced():
    reference = KernelPolicy(kernels="reference")
    assert not reference.use_triton(torch.zeros(2, 2))
    if torch.cuda.is_available():
        assert not reference.use_triton(torch.zeros(2, 2, device="cuda"))
    with pytest.raises(ValueError):
        KernelPolicy(kernels="fast")
    with pytest.raises(ValueError):
        KernelPolicy.from_env({"LORA_MEM_KERNELS": "fast"})


@requires_kernels
def test_dispatch_policy_forces_triton(monkeypatch):
    triton_policy = KernelPolicy(kernels="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = _spy_paths(monkeypatch)
    inp = make_inputs((4,), 16, 8, 2)
    assert triton_policy.use_triton(inp["x"])
    y = lora_linear(inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], 1.0, policy=triton_policy)
    assert calls == ["triton"]
    torch.testing.assert_close(
        y, lora_linear_reference(inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], 1.0),
        atol=1e-4, rtol=1e-4,
    )
    # A trainable base layer is outside the kernel's contract: the dispatcher falls back to the reference.
    calls.clear()
    lora_linear(inp["x"], inp["weight"].requires_grad_(), inp["bias"], inp["lora_A"], inp["lora_B"], 1.0,
                policy=triton_policy)
    assert calls == ["reference"]


def test_dispatch_triton_without_interpreter_stays_on_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not KernelPolicy(kernels="triton").use_triton(torch.zeros(2, 2))


# ---------------------------------------------------------------------------------------------------------------------
# The kernel policy
# ---------------------------------------------------------------------------------------------------------------------


def test_kernel_policy_is_parsed_from_the_environment_and_the_command_line():
    import argparse
    import dataclasses

    from lora_mem.kernels.policy import add_kernel_args

    # from_env resolves cpu_bf16 (the tests' CPU has no bf16 instructions: conftest); KernelPolicy() leaves it unsaid
    assert KernelPolicy.from_env({}) == KernelPolicy(cpu_bf16=False) and KernelPolicy().cpu_bf16 is None
    assert KernelPolicy().to_dict() == {"kernels": "auto", "fused_ops": False, "cpu_attention": "blocks", "tf32": False,
                                        "cpu_bf16": False}  # no bf16 instructions in the tests' CPU (conftest)
    env = {"LORA_MEM_KERNELS": " Triton", "LORA_MEM_CPU_ATTENTION": "sdpa", "LORA_MEM_TF32": "1"}
    # LORA_MEM_KERNELS=triton turns the fused ops on with the LoRA kernels
    assert KernelPolicy.from_env(env) == KernelPolicy(kernels="triton", fused_ops=True, cpu_attention="sdpa", tf32=True, cpu_bf16=False)
    assert KernelPolicy.from_env({"LORA_MEM_FUSED_OPS": "1"}) == KernelPolicy(fused_ops=True, cpu_bf16=False)
    for name, value in (("LORA_MEM_CPU_ATTENTION", "flash"), ("LORA_MEM_TF32", "yes"), ("LORA_MEM_FUSED_OPS", "2")):
        with pytest.raises(ValueError, match=name):
            KernelPolicy.from_env({name: value})
    with pytest.raises(ValueError, match="cpu_attention"):
        KernelPolicy(cpu_attention="flash")
    with pytest.raises(dataclasses.FrozenInstanceError):
        KernelPolicy().kernels = "triton"

    ap = argparse.ArgumentParser()
    add_kernel_args(ap)
    assert KernelPolicy.from_args(ap.parse_args([]), environ={}) == KernelPolicy(cpu_bf16=False)
    assert KernelPolicy.from_args(ap.parse_args([]), environ=env) == KernelPolicy.from_env(env)
    args = ap.parse_args(["--kernels", "reference", "--no-fused-ops", "--no-tf32"])  # flags given win
    assert KernelPolicy.from_args(args, environ=env) == KernelPolicy(kernels="reference", cpu_attention="sdpa", cpu_bf16=False)
    with pytest.raises(SystemExit):
        ap.parse_args(["--cpu-attention", "flash"])


def test_tf32_follows_the_policy_not_torchs_switch():
    from lora_mem.kernels._common import dot_flags

    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert dot_flags(torch.float32, False) == (False, "ieee")
        assert dot_flags(torch.float32, False, tf32=True) == (False, "tf32")
        assert dot_flags(torch.bfloat16, True) == (True, "tf32")  # 16-bit operands: the compiler's default
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@requires_kernels
@pytest.mark.parametrize("tf32", [False, True])
def test_tf32_reaches_every_launch_forward_and_backward(monkeypatch, tf32):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    seen = []
    real = lora_linear_module.dot_flags
    monkeypatch.setattr(lora_linear_module, "dot_flags", lambda *a: seen.append(a[2]) or real(*a))
    inp = make_inputs((6,), 16, 8, 2)
    x = inp["x"].to(DEVICE).requires_grad_()
    lora_A, lora_B = (inp[k].to(DEVICE).requires_grad_() for k in ("lora_A", "lora_B"))
    y = lora_linear(x, inp["weight"].to(DEVICE), None, lora_A, lora_B, 1.0,
                    policy=KernelPolicy(kernels="triton", tf32=tf32))
    y.sum().backward()
    assert seen == [tf32] * 6  # forward: thin + fused; backward: dt, dB, dA, dX
