"""Micro-benchmark of the LoRA linear at Qwen2.5-1.5B-Instruct shapes: floor vs PEFT-style unfused vs fused kernel.

    python -m bench.perf.kernels                      # GPU: bf16, all shapes, tokens 2048..16384, ranks 8/16/64
    python -m bench.perf.kernels --quick              # a small subset (on CPU this is the default)
    python -m bench.perf.kernels --shapes down --ranks 16 --tokens 8192

Per (layer shape, tokens, rank) and per phase (forward, backward, forward + backward) it times:

* ``floor``: the base layer alone: forward ``F.linear(x, W, b)``; backward the input-gradient GEMM ``dY @ W`` (with
  W frozen that is all the base layer costs); forward + backward the sum of the two medians.
* ``unfused``: the LoRA linear as PEFT computes it, ``F.linear(x, W, b) + s * F.linear(F.linear(dropout(x), A), B)``,
  through autograd (x, A, B require grad).
* ``fused`` (CUDA only): :func:`lora_mem.kernels.lora_linear.lora_linear_triton`.
* ``reference`` (the CPU default): :func:`lora_mem.kernels.lora_reference.lora_linear_reference`, the production CPU path.

Besides the LoRA linear it times the three fused row/elementwise ops at the same model's shapes (``--ops``):
RMSNorm (hidden 1536), rotary embedding of q and k (12 + 2 heads of 128) and SwiGLU's silu(gate) * up (8960), each
``reference`` (the PyTorch code the model runs on CPU) against ``triton`` (CUDA only: :mod:`lora_mem.kernels.rms_norm`,
:mod:`lora_mem.kernels.rope`, :mod:`lora_mem.kernels.swiglu`), forward / backward / both, as ms and achieved GB/s of the minimal
traffic (every input read once, every output written once). These rows go under the key ``fused_ops`` of the same
JSON. The Triton kernels were written without a GPU at hand: this benchmark is their first timing.

Timing: ``triton.testing.do_bench`` on CUDA (warm-up excluded, median and 20/80 % quantiles); on CPU
``time.perf_counter`` after warm-up runs, median of repeats. Backward alone is timed as ``y.backward(dY,
retain_graph=True)`` on one stored forward. Reported per phase: milliseconds, TFLOP/s (useful flops: base GEMM +
LoRA, no dropout or bias), tokens/s, ``x_floor`` (time / floor time, the overhead of LoRA over the bare layer) and
``speedup_vs_unfused`` (unfused time / time). The JSON result goes to ``bench/results/kernels_<device>.json``,
written atomically.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import RESULTS_DIR, atomic_write_json, device_slug, run_info
from lora_mem.cli import Parser, float_in, non_negative_int, positive_int, positive_int_list
from lora_mem.kernels.policy import KernelPolicy
from lora_mem.kernels.lora_reference import lora_linear_reference, lora_scaling
from lora_mem.lora_core.inject import LoRAConfig

# Qwen2.5-1.5B-Instruct: hidden 1536, 12 query heads and 2 KV heads of 128, MLP 8960. (in_features, out_features).
QWEN25_1_5B_SHAPES: dict[str, tuple[int, int]] = {
    "qo": (1536, 1536),  # q_proj, o_proj
    "kv": (1536, 256),  # k_proj, v_proj (GQA: 2 x 128)
    "gate_up": (1536, 8960),  # gate_proj, up_proj
    "down": (8960, 1536),  # down_proj
}
BIASED = {"qo": True, "kv": True, "gate_up": False, "down": False}  # Qwen2 has q/k/v biases (o_proj has none)
DEFAULT_TOKENS = [2048, 4096, 8192, 16384]
QUICK_TOKENS = [128, 256]
DEFAULT_RANKS = [8, 16, 64]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PHASES = ("fwd", "bwd", "fwd_bwd")

# The fused ops at Qwen2.5-1.5B-Instruct shapes (rows are tokens).
OPS = ("rms_norm", "rope", "swiglu")
OP_SHAPES = {"hidden": 1536, "heads": 12, "kv_heads": 2, "head_dim": 128, "intermediate": 8960, "eps": 1e-6}
DEFAULT_OP_TOKENS = [2048, 8192, 16384]
QUICK_OP_TOKENS = [128, 512]

# Dense 16-bit tensor-core peaks from vendor data sheets (TFLOP/s, no sparsity), to put the measured rate in context.
PEAK_16BIT_TFLOPS = {"h100 pcie": 756.0, "h100": 989.0, "h200": 989.0, "a100": 312.0, "l40s": 362.0, "l4": 121.0}


def peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda" or dtype == torch.float32:
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, peak in PEAK_16BIT_TFLOPS.items():  # most specific first ("h100 pcie" before "h100")
        if key in name:
            return peak
    return None


# HBM bandwidth from vendor data sheets (GB/s), for the memory-bound fused ops.
PEAK_BANDWIDTH_GBPS = {"h100 pcie": 2000.0, "h100": 3350.0, "h200": 4800.0, "l40s": 864.0, "l4": 300.0}


def peak_bandwidth_gbps(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, peak in PEAK_BANDWIDTH_GBPS.items():  # most specific first
        if key in name:
            return peak
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], device: torch.device, grad_to_none: list[torch.Tensor], warmup: int,
            repeats: int) -> dict[str, float]:
    """Median and 20/80 % quantiles of ``fn``'s run time in ms, warm-up excluded, gradients reset between runs."""
    if device.type == "cuda":
        import triton.testing

        med, lo, hi = triton.testing.do_bench(fn, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
        return {"ms": med, "ms_p20": lo, "ms_p80": hi}

    def reset() -> None:
        for t in grad_to_none:
            t.grad = None

    for _ in range(warmup):
        reset()
        fn()
    times = []
    for _ in range(repeats):
        reset()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return {"ms": statistics.median(times), "ms_p20": q[0], "ms_p80": q[-1]}


# ---------------------------------------------------------------------------------------------------------------------
# The measured paths
# ---------------------------------------------------------------------------------------------------------------------


def unfused_peft(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=False, generator=None):
    """PEFT's LoRA Linear forward: the base output, then the LoRA branch added to it as a second tensor."""
    dropped = F.dropout(x, dropout_p, training) if dropout_p > 0 else x  # PEFT uses nn.Identity for p = 0
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(dropped, lora_A), lora_B)


def lora_methods(device: torch.device, tf32: bool = False) -> dict[str, Callable]:
    """The LoRA paths; ``fused`` (CUDA only) with its fp32 products in TF32 when ``tf32``."""
    methods: dict[str, Callable] = {"unfused": unfused_peft, "reference": lora_linear_reference}
    if device.type == "cuda":
        from lora_mem.kernels.lora_linear import lora_linear_triton

        methods["fused"] = lambda *args, **kwargs: lora_linear_triton(*args, tf32=tf32, **kwargs)
    return methods


def flops(tokens: int, in_f: int, out_f: int, rank: int) -> dict[str, dict[str, float]]:
    """Useful flops (multiply-add = 2) of each phase; backward with W frozen: dX, plus dA, dB and dt for LoRA."""
    base = 2.0 * tokens * in_f * out_f
    lora = 2.0 * tokens * rank * (in_f + out_f)  # x A^T and t B^T (and, backward: dt, dB; dA, dt A)
    return {
        "floor": {"fwd": base, "bwd": base, "fwd_bwd": 2 * base},
        "lora": {"fwd": base + lora, "bwd": base + 2 * lora, "fwd_bwd": 2 * base + 3 * lora},
    }


def bench_floor(x, weight, bias, dy, device, warmup, repeats) -> dict[str, dict[str, float]]:
    fwd = time_ms(lambda: F.linear(x, weight, bias), device, [], warmup, repeats)
    bwd = time_ms(lambda: torch.matmul(dy, weight), device, [], warmup, repeats)  # dX = dY W: (M, out) @ (out, in)
    both = {k: fwd[k] + bwd[k] for k in fwd}  # the floor of forward + backward: the sum of the two
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": both}


def bench_lora(fn, x, weight, bias, lora_A, lora_B, scaling, dy, dropout_p, device, warmup, repeats):
    params = [x, lora_A, lora_B]
    training = dropout_p > 0

    def forward():
        return fn(x, weight, bias, lora_A, lora_B, scaling, dropout_p=dropout_p, training=training)

    def forward_backward():
        forward().backward(dy)

    forward_backward()  # compile + autotune outside the timed region
    out = {"fwd": time_ms(forward, device, params, warmup, repeats)}
    y = forward()
    out["bwd"] = time_ms(functools.partial(y.backward, dy, retain_graph=True), device, params, warmup, repeats)
    del y
    out["fwd_bwd"] = time_ms(forward_backward, device, params, warmup, repeats)
    return out


def max_rel_error(fn, x, weight, bias, lora_A, lora_B, scaling) -> float:
    """Forward of ``fn`` against the fp32 reference, max |error| / max |reference| (a sanity check at full size)."""
    with torch.no_grad():
        got = fn(x, weight, bias, lora_A, lora_B, scaling).float()
        ref = lora_linear_reference(*(None if t is None else t.float() for t in (x, weight, bias, lora_A, lora_B)),
                                    scaling)
    return ((got - ref).abs().max() / ref.abs().max()).item()


# ---------------------------------------------------------------------------------------------------------------------
# Fused ops: RMSNorm, rotary embedding, SwiGLU
# ---------------------------------------------------------------------------------------------------------------------


def op_methods(op: str, device: torch.device) -> dict[str, Callable]:
    """``reference`` everywhere, ``triton`` on CUDA (on CPU the kernels would run in Triton's interpreter)."""
    if op == "rms_norm":
        from lora_mem.kernels.rms_norm import rms_norm_reference as ref, rms_norm_triton as fused
    elif op == "rope":
        from lora_mem.kernels.rope import apply_rotary_qk_reference as ref, apply_rotary_qk_triton as fused
    else:
        from lora_mem.kernels.swiglu import swiglu_reference as ref, swiglu_triton as fused
    return {"reference": ref, "triton": fused} if device.type == "cuda" else {"reference": ref}


def op_case(op: str, tokens: int, device: torch.device, dtype: torch.dtype, g: torch.Generator):
    """(leaves requiring grad, the call's other arguments, upstream gradients, minimal bytes per phase)."""
    s = OP_SHAPES
    size = torch.tensor([], dtype=dtype).element_size()

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device, dtype)

    if op == "rms_norm":
        C = s["hidden"]
        leaves = [rand(tokens, C).requires_grad_(), rand(C, scale=0.1, shift=1.0).requires_grad_()]
        extra, grads = (s["eps"],), (rand(tokens, C),)
        fwd, bwd = 2 * tokens * C * size, 3 * tokens * C * size  # x -> y; dy, x -> dx (weight, dW: one row each)
    elif op == "rope":
        H, Hkv, D = s["heads"], s["kv_heads"], s["head_dim"]
        q = rand(1, tokens, H, D).transpose(1, 2).requires_grad_()  # the model's layout: (B, H, T, D) views
        k = rand(1, tokens, Hkv, D).transpose(1, 2).requires_grad_()
        positions = torch.arange(tokens, device=device)[None].float()
        inv_freq = 1.0 / (1e6 ** (torch.arange(0, D, 2, device=device).float() / D))
        emb = torch.cat([positions[..., None] * inv_freq] * 2, dim=-1)  # (1, T, D)
        leaves, extra = [q, k], (emb.cos().to(dtype), emb.sin().to(dtype))
        grads = (rand(1, H, tokens, D), rand(1, Hkv, tokens, D))
        fwd = bwd = (2 * tokens * (H + Hkv) * D + 2 * tokens * D) * size  # q, k in and out; cos, sin read
    else:
        inter = s["intermediate"]
        leaves, extra = [rand(tokens, inter, scale=2.0).requires_grad_(), rand(tokens, inter).requires_grad_()], ()
        grads = (rand(tokens, inter),)
        fwd, bwd = 3 * tokens * inter * size, 5 * tokens * inter * size  # g, u -> y; dy, g, u -> dg, du
    return leaves, extra, grads, {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}


def bench_op(fn, leaves, extra, grads, device, warmup, repeats) -> dict[str, dict[str, float]]:
    def forward():
        out = fn(*leaves, *extra)
        return out if isinstance(out, tuple) else (out,)

    def forward_backward():
        torch.autograd.backward(forward(), grads)

    forward_backward()  # compile outside the timed region
    out = {"fwd": time_ms(forward, device, leaves, warmup, repeats)}
    outs = forward()
    out["bwd"] = time_ms(functools.partial(torch.autograd.backward, outs, grads, retain_graph=True), device, leaves,
                         warmup, repeats)
    del outs
    out["fwd_bwd"] = time_ms(forward_backward, device, leaves, warmup, repeats)
    return out


def op_max_rel_error(fn, reference, leaves, extra) -> float:
    """Forward of ``fn`` against the reference in fp32, max |error| / max |reference|, over all outputs."""
    with torch.no_grad():
        got = fn(*leaves, *extra)
        ref = reference(*(t.float() for t in leaves), *(t.float() if torch.is_tensor(t) else t for t in extra))
    got, ref = (got, ref) if isinstance(got, tuple) else ((got,), (ref,))
    return max(((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref))


def run_op_benchmark(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    peak = peak_bandwidth_gbps(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for op in args.ops:
        methods = op_methods(op, device)
        for tokens in args.op_tokens:
            leaves, extra, grads, nbytes = op_case(op, tokens, device, dtype, g)
            timings = {name: bench_op(fn, leaves, extra, grads, device, args.warmup, args.repeats)
                       for name, fn in methods.items()}
            row = {"op": op, "tokens": tokens, "bytes": nbytes, "results": {}}
            if "triton" in methods:
                row["triton_max_rel_error"] = op_max_rel_error(methods["triton"], methods["reference"], leaves, extra)
            for name, phases in timings.items():
                res = {}
                for phase in PHASES:
                    entry = dict(phases[phase])
                    entry["gb_per_s"] = nbytes[phase] / (entry["ms"] * 1e-3) / 1e9
                    entry["tokens_per_s"] = tokens / (entry["ms"] * 1e-3)
                    entry["speedup_vs_reference"] = timings["reference"][phase]["ms"] / entry["ms"]
                    if peak is not None:
                        entry["fraction_of_peak_bandwidth"] = entry["gb_per_s"] / peak
                    res[phase] = entry
                row["results"][name] = res
            rows.append(row)
            print_op_row(row, list(methods))
            del leaves, extra, grads
    return rows


def print_op_row(row: dict, names: list[str]) -> None:
    for phase in PHASES:
        cols = [f"{row['op']:8} {row['tokens']:>6} {phase:7}"]
        for name in names:
            e = row["results"][name][phase]
            cols.append(f"{name:>9} {e['ms']:>8.3f} ms {e['gb_per_s']:>7.1f} GB/s")
        cols.append(f"x{row['results'][names[-1]][phase]['speedup_vs_reference']:.2f} vs reference")
        print(" | ".join(cols), flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------------


def run_benchmark(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                  selected: list[str]) -> list[dict]:
    methods = lora_methods(device, args.tf32)
    peak = peak_tflops(device, dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for shape in args.shapes:
        in_f, out_f = QWEN25_1_5B_SHAPES[shape]
        weight = (torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)).to(device, dtype)
        bias = torch.randn(out_f, generator=g).to(device, dtype) if BIASED[shape] else None
        for tokens in args.tokens:
            x = torch.randn(tokens, in_f, generator=g).to(device, dtype).requires_grad_()
            dy = torch.randn(tokens, out_f, generator=g).to(device, dtype)
            floor = bench_floor(x.detach(), weight, bias, dy, device, args.warmup, args.repeats)
            for rank in args.ranks:
                lora_A = (torch.randn(rank, in_f, generator=g) / math.sqrt(in_f)).to(device, dtype).requires_grad_()
                lora_B = (torch.randn(out_f, rank, generator=g) * 0.01).to(device, dtype).requires_grad_()
                scaling = lora_scaling(rank, LoRAConfig(rank=rank).alpha)
                fl = flops(tokens, in_f, out_f, rank)
                row = {"shape": shape, "in_features": in_f, "out_features": out_f, "bias": bias is not None,
                       "tokens": tokens, "rank": rank, "results": {}}
                timings = {"floor": floor}
                for name in selected:
                    timings[name] = bench_lora(methods[name], x, weight, bias, lora_A, lora_B, scaling, dy,
                                               args.dropout, device, args.warmup, args.repeats)
                    if name == "fused":
                        row["fused_max_rel_error"] = max_rel_error(methods[name], x.detach(), weight, bias,
                                                                   lora_A.detach(), lora_B.detach(), scaling)
                for name, phases in timings.items():
                    res = {}
                    for phase in PHASES:
                        t = phases[phase]
                        f = fl["floor" if name == "floor" else "lora"][phase]
                        entry = dict(t)
                        entry["tflops"] = f / (t["ms"] * 1e-3) / 1e12
                        entry["tokens_per_s"] = tokens / (t["ms"] * 1e-3)
                        entry["x_floor"] = t["ms"] / floor[phase]["ms"]
                        if "unfused" in timings:
                            entry["speedup_vs_unfused"] = timings["unfused"][phase]["ms"] / t["ms"]
                        if peak is not None:
                            entry["fraction_of_peak"] = entry["tflops"] / peak
                        res[phase] = entry
                    row["results"][name] = res
                rows.append(row)
                print_row(row, selected, device)
                del lora_A, lora_B
            del x, dy
    return rows


def flop_unit(device: torch.device) -> tuple[str, float]:
    """The table's rate column: TFLOP/s on a GPU, GFLOP/s on a CPU (where TFLOP/s rounds to 0.00)."""
    return ("TF/s", 1.0) if device.type == "cuda" else ("GF/s", 1e3)


def print_header(selected: list[str], device: torch.device) -> None:
    unit, _ = flop_unit(device)
    cols = [f"{'shape':8} {'tokens':>6} {'r':>3} {'phase':7} {'floor ms':>9}"]
    for name in selected:
        cols.append(f"{name + ' ms':>13} {unit:>6} {'x floor':>7}")
    cols.append(f"{'vs unfused':>10}")  # speed-up of the last method over unfused
    line = " | ".join(cols)
    print(line)
    print("-" * len(line))


def print_row(row: dict, selected: list[str], device: torch.device) -> None:
    _, per_tflop = flop_unit(device)
    res = row["results"]
    last = selected[-1]
    for phase in PHASES:
        cols = [f"{row['shape']:8} {row['tokens']:>6} {row['rank']:>3} {phase:7} {res['floor'][phase]['ms']:>9.3f}"]
        for name in selected:
            e = res[name][phase]
            cols.append(f"{e['ms']:>13.3f} {e['tflops'] * per_tflop:>6.1f} {e['x_floor']:>7.2f}")
        speedup = res[last][phase].get("speedup_vs_unfused", float("nan"))
        cols.append(f"{speedup:>10.2f}")
        print(" | ".join(cols), flush=True)


def choice_list(allowed, none: bool = False):
    """A comma-separated list out of `allowed` (or, with none, the word 'none': an empty list)."""
    def parse(text: str) -> list[str]:
        if none and text.strip() == "none":
            return []
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not values or any(v not in allowed for v in values):
            raise argparse.ArgumentTypeError(f"must be a comma-separated list out of {', '.join(allowed)}"
                                             f"{' or none' if none else ''}, got {text!r}")
        return values
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m bench.perf.kernels",
        description="Time the LoRA linear (base-layer floor, PEFT-style unfused, fused Triton kernel) at "
                    "Qwen2.5-1.5B-Instruct layer shapes, forward / backward / both.",
    )
    p.add_argument("--tokens", type=positive_int_list, default=None,
                   help=f"comma-separated token counts (rows of x). Default {DEFAULT_TOKENS}; "
                        f"{QUICK_TOKENS} with --quick or on CPU")
    p.add_argument("--ranks", type=positive_int_list, default=DEFAULT_RANKS,
                   help=f"comma-separated LoRA ranks (default {DEFAULT_RANKS})")
    p.add_argument("--shapes", type=choice_list(list(QWEN25_1_5B_SHAPES)), default=list(QWEN25_1_5B_SHAPES),
                   help="comma-separated layer shapes out of " + ", ".join(
                       f"{k} ({i}->{o})" for k, (i, o) in QWEN25_1_5B_SHAPES.items()) + " (default: all)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="dtype of activations and weights (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--quick", action="store_true",
                   help=f"small token counts {QUICK_TOKENS} (the default on CPU, where --tokens overrides it)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="where to run (auto: CUDA if available)")
    p.add_argument("--methods", type=choice_list(["unfused", "reference", "fused"]), default=None,
                   help="LoRA paths to time besides the floor, out of unfused, reference, fused (CUDA only). "
                        "Default: unfused,fused on CUDA, unfused,reference on CPU")
    p.add_argument("--dropout", type=float_in(0.0, 1.0, low_open=False, high_open=True), default=0.0,
                   help="LoRA dropout probability, applied in training mode (default 0: PEFT's identity)")
    p.add_argument("--ops", type=choice_list(OPS, none=True), default=list(OPS),
                   help=f"fused ops to time after the LoRA linear, out of {', '.join(OPS)}, or 'none' "
                        "(default: all)")
    p.add_argument("--op-tokens", type=positive_int_list, default=None,
                   help=f"comma-separated token counts for the fused ops. Default {DEFAULT_OP_TOKENS}; "
                        f"{QUICK_OP_TOKENS} with --quick or on CPU")
    p.add_argument("--skip-lora", action="store_true",
                   help="time only the fused ops (the JSON's LoRA rows are then empty)")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="CPU only: untimed runs before timing (default 1)")
    p.add_argument("--repeats", type=positive_int, default=5,
                   help="CPU only: timed runs, the median is reported (default 5)")
    p.add_argument("--tf32", action="store_true",
                   help="fp32 products of the fused kernel in TF32 (the kernel policy's switch; default: full fp32, "
                        "recorded in the results as kernel_fp32_precision)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output path (default bench/results/kernels_<device>.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device on this machine")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          (args.device if args.device != "auto" else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.tokens is None:
        args.tokens = QUICK_TOKENS if (args.quick or device.type == "cpu") else DEFAULT_TOKENS
    if args.op_tokens is None:
        args.op_tokens = QUICK_OP_TOKENS if (args.quick or device.type == "cpu") else DEFAULT_OP_TOKENS
    selected = args.methods or (["unfused", "fused"] if device.type == "cuda" else ["unfused", "reference"])
    if "fused" in selected and device.type != "cuda":
        ap.error("--methods fused: the fused kernel is timed on CUDA only (on CPU it would run in Triton's "
                 "interpreter)")
    out_path = args.out or RESULTS_DIR / f"kernels_{device_slug(device)}.json"

    info = run_info(device, KernelPolicy(tf32=args.tf32))
    peak = peak_tflops(device, dtype)
    print(f"device: {info['device']}  dtype: {dtype}  peak 16-bit: {peak or 'unknown'} TFLOP/s  "
          f"torch {info['versions'].get('torch')}  triton {info['versions'].get('triton')}")
    started = time.time()
    rows = []
    if not args.skip_lora:
        print_header(selected, device)
        rows = run_benchmark(args, device, dtype, selected)
    op_rows = []
    if args.ops:
        bandwidth = peak_bandwidth_gbps(device) or "unknown"
        print(f"fused ops at Qwen2.5-1.5B shapes {OP_SHAPES}, peak bandwidth {bandwidth} GB/s")
        op_rows = run_op_benchmark(args, device, dtype)
    result = {
        **info,
        "device_slug": device_slug(device),
        "dtype": str(dtype).removeprefix("torch."),
        "model_shapes": "Qwen2.5-1.5B-Instruct",
        "settings": {"tokens": args.tokens, "ranks": args.ranks, "shapes": args.shapes, "dropout": args.dropout,
                     "methods": selected, "scaling": "alpha / r with alpha = 2r",
                     "timer": "triton.testing.do_bench median" if device.type == "cuda" else
                     f"time.perf_counter, {args.warmup} warm-up, median of {args.repeats}",
                     "torch_threads": torch.get_num_threads(),
                     # which precision fp32 products ran in: the fused kernel's (--tf32), torch's (unfused, floor)
                     "kernel_fp32_precision": "tf32" if args.tf32 else "ieee",
                     "torch_fp32_matmul_precision": torch.backends.cuda.matmul.fp32_precision},
        "peak_16bit_tflops": peak,
        "notes": "floor fwd = F.linear(x, W, b); floor bwd = dY @ W (input gradient, W frozen); floor fwd_bwd = sum. "
                 "x_floor = time / floor time; speedup_vs_unfused = unfused time / time.",
        "elapsed_s": time.time() - started,
        "loadavg_end": os.getloadavg(),  # other work on the machine shows up here (and in loadavg_start)
        "rows": rows,
        "fused_ops": {
            "shapes": OP_SHAPES,
            "settings": {"ops": args.ops, "tokens": args.op_tokens,
                         "methods": ["reference", "triton"] if device.type == "cuda" else ["reference"]},
            "peak_bandwidth_gbps": peak_bandwidth_gbps(device),
            "notes": "bytes = minimal traffic per phase (inputs read once, outputs written once); gb_per_s = bytes / "
                     "time; speedup_vs_reference = reference time / time; triton_max_rel_error = forward max |error| "
                     "/ max |fp32 reference|. rope: B = 1, T = tokens, the model's (B, H, T, D) views of (B, T, H, D).",
            "rows": op_rows,
        },
    }
    atomic_write_json(out_path, result)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
