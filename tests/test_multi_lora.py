"""Multi-adapter LoRA linear (one adapter per row, -1 = none): the PyTorch reference held against a per-row loop of the
single-adapter reference, and the Triton kernels held against the reference.

Without CUDA the kernels run through Triton's CPU interpreter (TRITON_INTERPRET must be set before triton is imported,
hence the environment line above the imports). Shapes stay at tens of rows/columns so the file runs in well under a
minute on one core.
"""

import itertools
import math
import os

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lora_mem.kernels import multi_lora_linear as mll  # noqa: E402
from lora_mem.kernels.lora_linear import HAS_TRITON  # noqa: E402
from lora_mem.kernels.lora_reference import lora_linear_reference  # noqa: E402
from lora_mem.kernels.multi_lora_linear import (  # noqa: E402
    multi_lora_linear,
    multi_lora_linear_triton,
    plan_adapter_rows,
)
from lora_mem.kernels.multi_lora_reference import multi_lora_linear_reference, token_adapter_ids  # noqa: E402
from lora_mem.kernels.policy import KernelPolicy  # noqa: E402
from tests.kernel_testing import DEVICE, KERNELS_RUNNABLE, assert_close_scaled, requires_kernels  # noqa: E402

# (dtype, atol, rtol) against a float64 reference on the same rounded inputs, atol relative to the largest entry of
# the expected output; the same reasoning and values as tests/test_lora_kernels.py (t = s x A^T is stored in the input
# dtype, and the interpreter's fp32 -> bf16 cast truncates). test_tolerance_can_fail shows they can fail.
DTYPE_TOLERANCES = [
    pytest.param(torch.float32, 1e-4, 1e-4, id="fp32"),
    pytest.param(torch.bfloat16, 2e-2, 2e-2, id="bf16"),
]
FP16_TOLERANCE = (5e-3, 5e-3)


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def make_inputs(leading, in_features, out_features, rank, n_adapters=4, bias=True, seed=0):
    """Float32 CPU tensors with O(1) outputs; each adapter has its own A, B and scaling."""
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(*leading, in_features, generator=g),
        "weight": torch.randn(out_features, in_features, generator=g) / math.sqrt(in_features),
        "bias": torch.randn(out_features, generator=g) if bias else None,
        "lora_A_stack": torch.randn(n_adapters, rank, in_features, generator=g) / math.sqrt(in_features),
        "lora_B_stack": torch.randn(n_adapters, out_features, rank, generator=g) / math.sqrt(rank),
        "scalings": torch.linspace(0.5, 2.0, n_adapters),
    }


def mixed_ids(n_rows, n_adapters, seed=0):
    """Ids in [-1, n_adapters) with no adapter (-1) and a repeated id guaranteed, the rest random and interleaved."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, n_adapters, (n_rows,), generator=g)
    ids[0], ids[1], ids[-1] = n_adapters - 1, -1, n_adapters - 1
    return ids


ARG_ORDER = ("x", "weight", "bias", "lora_A_stack", "lora_B_stack", "scalings")


def run(fn, inputs, ids, dtype, device=DEVICE, **overrides):
    """``fn`` on the inputs cast to ``dtype`` (scalings stay fp32), under no_grad; the output in float64 on the CPU."""
    args = []
    for k in ARG_ORDER:
        v = overrides.get(k, inputs[k])
        if v is not None:
            v = v.to(device=device, dtype=torch.float32 if k == "scalings" else dtype)
        args.append(v)
    with torch.no_grad():
        y = fn(*args, ids.to(device))
    return y.double().cpu()


def reference64(inputs, ids, dtype, **overrides):
    """The reference in float64 on the inputs rounded to ``dtype`` first (the kernels see exactly these values)."""
    rounded = {k: None if v is None else (v if k == "scalings" else v.to(dtype)) for k, v in inputs.items()}
    return run(multi_lora_linear_reference, rounded, ids, torch.float64, device="cpu", **overrides)


# ---------------------------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("leading", [(9,), (4, 3)], ids=["2d", "3d"])
def test_reference_matches_per_row_single_adapter_loop(leading, bias):
    """Exact semantics: every row (sequence, for 3-D x) is the single-adapter reference with its own adapter, or the
    plain base layer for id -1."""
    inp = {k: None if v is None else v.double() for k, v in make_inputs(leading, 12, 10, 3, bias=bias).items()}
    ids = torch.tensor([2, -1, 0, 2, 3, -1, 1, 2, 0][: leading[0]])
    got = multi_lora_linear_reference(*(inp[k] for k in ARG_ORDER), ids)
    assert got.shape == (*leading, 10)
    for i, a in enumerate(ids.tolist()):
        if a < 0:
            expected = F.linear(inp["x"][i], inp["weight"], inp["bias"])
        else:
            expected = lora_linear_reference(inp["x"][i], inp["weight"], inp["bias"], inp["lora_A_stack"][a],
                                             inp["lora_B_stack"][a], float(inp["scalings"][a]))
        torch.testing.assert_close(got[i], expected, msg=lambda m, i=i: f"row {i}: {m}")


def test_reference_without_adapters_is_exactly_the_base_layer():
    inp = make_inputs((7,), 16, 9, 4)
    got = multi_lora_linear_reference(*(inp[k] for k in ARG_ORDER), torch.full((7,), -1))
    assert torch.equal(got, F.linear(inp["x"], inp["weight"], inp["bias"]))


def test_reference_rejects_bad_arguments():
    inp = make_inputs((5,), 16, 8, 2, n_adapters=3)
    args = [inp[k] for k in ARG_ORDER]
    for bad_ids in (torch.tensor([0, 1, 3, 0, 0]), torch.tensor([0, -2, 0, 0, 0])):  # 3 == n_adapters; -2 < -1
        with pytest.raises(ValueError, match=r"\[-1, 3\)"):
            multi_lora_linear_reference(*args, bad_ids)
    with pytest.raises(ValueError, match="adapter_ids"):
        multi_lora_linear_reference(*args, torch.zeros(4, dtype=torch.int64))  # one id short
    with pytest.raises(ValueError, match="adapter_ids"):
        multi_lora_linear_reference(*args, torch.zeros(5))  # float ids
    with pytest.raises(ValueError, match="scalings"):
        multi_lora_linear_reference(*args[:5], torch.ones(2), torch.zeros(5, dtype=torch.int64))


def test_token_ids_and_row_plan():
    x = torch.zeros(3, 2, 4)  # 3 sequences of 2 tokens
    assert token_adapter_ids(torch.tensor([1, -1, 0]), x).tolist() == [1, 1, -1, -1, 0, 0]
    plan = plan_adapter_rows(torch.tensor([2, -1, 0, 2, -1, 1, 2]))
    assert plan.ids.tolist() == [-1, -1, 0, 1, 2, 2, 2]
    assert plan.rows.tolist() == [1, 4, 2, 5, 0, 3, 6]  # stable: equal ids keep their order
    assert plan.seg_end.tolist() == [2, 2, 3, 4, 7, 7, 7]
    assert plan.rows.dtype == plan.ids.dtype == plan.seg_end.dtype == torch.int32


# ---------------------------------------------------------------------------------------------------------------------
# Kernels against the reference
# ---------------------------------------------------------------------------------------------------------------------

# (M, in, out, bias): M in {5, 33}, in and out in {16, 42, 70} (one block, ragged, several ragged blocks).
SHAPES = [  # bias on every other shape
    pytest.param(M, n_in, n_out, i % 2 == 0, id=f"{M}x{n_in}->{n_out}" + ("+b" if i % 2 == 0 else ""))
    for i, (M, n_in, n_out) in enumerate(itertools.product((5, 33), (16, 42, 70), (16, 42, 70)))
]


@requires_kernels
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("rank", [1, 8, 16])
@pytest.mark.parametrize("M,in_features,out_features,bias", SHAPES)
def test_kernel_matches_reference(M, in_features, out_features, bias, rank, dtype, atol, rtol):
    inp = make_inputs((M,), in_features, out_features, rank, bias=bias)
    ids = mixed_ids(M, 4, seed=M + rank)
    got = run(multi_lora_linear_triton, inp, ids, dtype)
    expected = reference64(inp, ids, dtype)
    assert_close_scaled(got, expected, atol, rtol)
    # Rows without an adapter are the base layer; the others really carry their LoRA term (well above tolerance).
    base = reference64(inp, torch.full_like(ids, -1), dtype)
    assert_close_scaled(got[ids < 0], base[ids < 0], atol, rtol)
    assert (got - base)[ids >= 0].abs().max() > 10 * atol * expected.abs().max()


@requires_kernels
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES)
def test_kernel_3d_input_one_adapter_per_sequence(dtype, atol, rtol):
    inp = make_inputs((3, 11), 42, 70, 8)  # 33 tokens: each 16-row tile holds parts of two or three sequences
    ids = torch.tensor([1, -1, 1])
    got = run(multi_lora_linear_triton, inp, ids, dtype)
    assert got.shape == (3, 11, 70)
    assert_close_scaled(got, reference64(inp, ids, dtype), atol, rtol)


@requires_kernels
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES)
def test_kernel_every_row_its_own_adapter(dtype, atol, rtol):
    """Decode-like: 33 rows, 31 distinct adapters and two without; every tile walks about 16 one-row segments."""
    inp = make_inputs((33,), 42, 24, 8, n_adapters=40)
    ids = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:33]
    ids[[4, 20]] = -1
    assert_close_scaled(run(multi_lora_linear_triton, inp, ids, dtype), reference64(inp, ids, dtype), atol, rtol)


@requires_kernels
@pytest.mark.parametrize("rank", [48, 64])  # 48 pads to a 64-wide block
def test_kernel_large_ranks(rank):
    inp = make_inputs((21,), 40, 24, rank)
    ids = mixed_ids(21, 4)
    assert_close_scaled(run(multi_lora_linear_triton, inp, ids, torch.float32),
                        reference64(inp, ids, torch.float32), 1e-4, 1e-4)


@requires_kernels
def test_kernel_fp16():
    inp = make_inputs((33,), 42, 70, 8)
    ids = mixed_ids(33, 4)
    assert_close_scaled(run(multi_lora_linear_triton, inp, ids, torch.float16),
                        reference64(inp, ids, torch.float16), *FP16_TOLERANCE)


@requires_kernels
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES)
def test_tolerance_can_fail(dtype, atol, rtol):
    """A 10 % error in one adapter's scaling, or one row served by the wrong adapter, must trip the tolerances."""
    inp = make_inputs((33,), 42, 16, 8)
    ids = mixed_ids(33, 4)
    wrong_scaling = inp["scalings"].clone()
    wrong_scaling[ids[5]] *= 1.1
    got = run(multi_lora_linear_triton, inp, ids, dtype, scalings=wrong_scaling)
    with pytest.raises(AssertionError):
        assert_close_scaled(got, reference64(inp, ids, dtype), atol, rtol)
    swapped = ids.clone()
    swapped[5] = (ids[5] + 1) % 4
    got = run(multi_lora_linear_triton, inp, swapped, dtype)
    with pytest.raises(AssertionError):
        assert_close_scaled(got, reference64(inp, ids, dtype), atol, rtol)


@requires_kernels
def test_kernel_edge_batches_and_plan_reuse():
    inp = make_inputs((6,), 16, 8, 4)
    args = [None if inp[k] is None else inp[k].to(DEVICE) for k in ARG_ORDER]
    with torch.no_grad():
        # No adapter anywhere: the base layer.
        y = multi_lora_linear_triton(*args, torch.full((6,), -1, device=DEVICE))
        torch.testing.assert_close(y, F.linear(*args[:3]), atol=1e-5, rtol=1e-5)
        # Empty batch.
        assert multi_lora_linear_triton(args[0][:0], *args[1:], torch.zeros(0, dtype=torch.int64)).shape == (0, 8)
        # A plan built once (as a model would, for all its layers) gives the same result as the default one.
        ids = torch.tensor([3, 0, -1, 3, 3, 1], device=DEVICE)
        plan = plan_adapter_rows(ids)
        torch.testing.assert_close(multi_lora_linear_triton(*args, ids, plan=plan),
                                   multi_lora_linear_triton(*args, ids))
        with pytest.raises(ValueError, match="plan"):
            multi_lora_linear_triton(*args, ids, plan=plan_adapter_rows(ids[:5]))
        # Strided views of x and W (no copies are made, the kernels take any strides).
        x_strided = torch.randn(6, 32, device=DEVICE)[:, ::2]
        w_strided = torch.randn(16, 8, device=DEVICE).t()
        got = multi_lora_linear_triton(x_strided, w_strided, *args[2:], ids)
        torch.testing.assert_close(got, multi_lora_linear_reference(x_strided, w_strided, *args[2:], ids),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_autotune_pruning_keeps_small_tiles_for_decode():
    few = mll._prune_multi_configs(mll._MULTI_FUSED_CONFIGS, {"M_BUCKET": 4, "N": 1536})
    assert few and all(c.kwargs["BLOCK_M"] == 16 for c in few)
    assert mll._prune_multi_configs(mll._MULTI_FUSED_CONFIGS, {"M_BUCKET": 8192, "N": 8960}) == mll._MULTI_FUSED_CONFIGS
    assert mll._prune_multi_configs(mll._MULTI_SHRINK_CONFIGS, {"M_BUCKET": 1, "K": 1536})


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch and the inference-only contract
# ---------------------------------------------------------------------------------------------------------------------


def _spy_paths(monkeypatch):
    calls = []
    real_triton, real_reference = mll.multi_lora_linear_triton, mll.multi_lora_linear_reference
    monkeypatch.setattr(mll, "multi_lora_linear_triton", lambda *a, **k: calls.append("triton") or real_triton(*a, **k))
    monkeypatch.setattr(mll, "multi_lora_linear_reference",
                        lambda *a, **k: calls.append("reference") or real_reference(*a, **k))
    return calls


def test_dispatch_cpu_default_is_reference(monkeypatch):
    calls = _spy_paths(monkeypatch)
    inp = make_inputs((4,), 16, 8, 2)
    multi_lora_linear(*(inp[k] for k in ARG_ORDER), torch.tensor([0, -1, 3, 0]))
    assert calls == ["reference"]


@requires_kernels
def test_dispatch_policy_forces_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = _spy_paths(monkeypatch)
    inp = make_inputs((4,), 16, 8, 2)
    ids = torch.tensor([0, -1, 3, 0])
    y = multi_lora_linear(*(inp[k] for k in ARG_ORDER), ids, policy=KernelPolicy(kernels="triton"))
    assert calls == ["triton"]
    torch.testing.assert_close(y, multi_lora_linear_reference(*(inp[k] for k in ARG_ORDER), ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["reference", "triton"])
def test_inference_only(monkeypatch, mode):
    """Stacks that require grad are refused while autograd is on, on either path; under no_grad they are fine."""
    if mode == "triton" and not KERNELS_RUNNABLE:
        pytest.skip("needs triton with CUDA or TRITON_INTERPRET=1")
    policy = KernelPolicy(kernels=mode)
    inp = make_inputs((4,), 16, 8, 2)
    inp["lora_B_stack"].requires_grad_()
    ids = torch.tensor([0, -1, 3, 0])
    with pytest.raises(ValueError, match="forward-only"):
        multi_lora_linear(*(inp[k] for k in ARG_ORDER), ids, policy=policy)
    with torch.no_grad():
        assert multi_lora_linear(*(inp[k] for k in ARG_ORDER), ids, policy=policy).shape == (4, 8)


def test_adapter_rows_plan_only_where_the_kernels_run(monkeypatch):
    """A model routes rows once per forward (adapter_rows): the sort by adapter is made only for the kernels, and
    multi_lora_linear hands it to them."""
    from lora_mem.kernels.multi_lora_linear import adapter_rows

    x = torch.zeros(3, 2, 4)  # 3 sequences of 2 tokens
    ids = torch.tensor([1, -1, 0])
    rows = adapter_rows(ids, x, KernelPolicy(kernels="reference"))
    assert rows.ids is ids and rows.plan is None
    if KERNELS_RUNNABLE and not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        rows = adapter_rows(ids, x, KernelPolicy(kernels="triton"))
        expected = plan_adapter_rows(token_adapter_ids(ids, x))
        assert all(torch.equal(a, b) for a, b in zip(rows.plan, expected))
        seen = []
        monkeypatch.setattr(mll, "multi_lora_linear_triton", lambda *a, **k: seen.append(k) or a[0])
        multi_lora_linear(*(make_inputs((4,), 16, 8, 2)[k] for k in ARG_ORDER), ids[:1].repeat(4),
                          plan=rows.plan, policy=KernelPolicy(kernels="triton", tf32=True))
        assert seen == [{"plan": rows.plan, "tf32": True}]
