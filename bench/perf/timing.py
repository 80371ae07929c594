"""What the speed benchmarks of bench/perf share: the synchronised timer, where the time goes (torch.profiler, ops
grouped by kind), the machine's load and peak memory, and the two setups they time (a CPU and a GPU).

Every benchmark here imports from this module and none from another benchmark, so the benchmarks import in any order.
"""

from __future__ import annotations

import os
import re
import resource
import statistics
import time
from collections import defaultdict
from typing import Callable

import torch

# The two setups: the default model in fp32 on a CPU; Qwen2.5-1.5B's shapes, randomly initialised (no weights on a
# lent GPU), in bf16 on a GPU. Sequence length and batch sizes are bench.perf.train_throughput's; bench.perf.step_floor
# times the floor of the same steps.
SETUPS = {
    "cpu": dict(model="smollm2-135m-instruct", dtype="float32", seq_len=512, batch_sizes=[1], device="cpu"),
    "gpu": dict(model="preset:qwen2.5-1.5b", dtype="bfloat16", seq_len=2048, batch_sizes=[1, 4, 8], device="cuda"),
}


def model_config(model_name: str):
    """The ModelConfig of a packaged name, a checkpoint directory or hub id, or ``preset:NAME``
    (lora_mem.model.config.PRESETS)."""
    from lora_mem.model.config import PRESETS, ModelConfig
    from lora_mem.model.loader import resolve_checkpoint

    if model_name.startswith("preset:"):
        return PRESETS[model_name.split(":", 1)[1]]
    return ModelConfig.from_file(resolve_checkpoint(model_name) / "config.json")


# ---------------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: list, repeats: int, device: torch.device) -> list[tuple[list[float], object]]:
    """Wall seconds of `repeats` calls of each fn() (synchronised) and each one's last result.

    The functions take turns within each repeat (A B C A B C ...), so a change in the load of a
    shared machine hits every side alike instead of whichever happened to run last.
    """
    times: list[list[float]] = [[] for _ in fns]
    results: list[object] = [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync(device)
            t0 = time.perf_counter()
            results[i] = fn()
            sync(device)
            times[i].append(time.perf_counter() - t0)
    return list(zip(times, results))


def saved_ms(seconds: float) -> float:
    """Milliseconds to four significant figures, as results files keep a time: a ratio of two saved times then
    agrees with a speedup saved beside them to 0.1%, at 0.03 ms as at 300 ms."""
    return float(f"{seconds * 1e3:.4g}")


def median_seconds(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of `repeats` synchronised calls of fn(), after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    ((times, _),) = timed([fn], repeats, device)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------------------------------


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM rather than ru_maxrss, which Linux carries over
    execve from the parent that spawned us."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------------------------------
# Where the time goes: torch.profiler, ops grouped by kind
# ---------------------------------------------------------------------------------------------------------------------

PROFILE_GROUPS = ("gemm", "attention", "elementwise", "optimizer", "loss", "other")
PROFILE_GROUP_NOTES = {
    "gemm": "matmul / linear / addmm / bmm and their backward nodes, cuBLAS/CUTLASS kernels, fused LoRA (Triton) kernels",
    "attention": "scaled_dot_product_attention (flash / efficient / math) forward and backward",
    "elementwise": "norms (RMSNorm pow/mean/rsqrt or a fused kernel), RoPE (mul/cat/neg or fused), SiLU/SwiGLU, "
                   "adds, casts, copies, cat",
    "optimizer": "everything under Optimizer.step / Optimizer.zero_grad (AdamW)",
    "loss": "cross-entropy: log_softmax/logsumexp/nll and lora-mem's chunked LM-head loss, except its GEMMs",
    "other": "embedding, views, autograd bookkeeping (AccumulateGrad), allocation, Python time between ops",
}
_OPTIMIZER = re.compile(r"^optimizer\.|_foreach_|_fused_adam")
_ATTENTION = re.compile(r"scaled_dot_product|flash|attention|fmha|sdpa")
_GEMM = re.compile(r"^(mm|addmm|bmm|baddbmm|matmul|linear|_addmm_activation|addmv|mv|dot|einsum|_scaled_mm)$"
                   r"|gemm|cublas|cutlass|xmma|matmul|loralinearfunction|_multi_shrink")
_LOSS = re.compile(r"loss|cross_entropy|log_softmax|logsoftmax|logsumexp|nll")
_ELEMENTWISE_OPS = {
    "add", "sub", "rsub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "reciprocal", "exp", "log", "mean", "sum",
    "silu", "gelu", "sigmoid", "tanh", "relu", "cos", "sin", "cat", "copy", "to", "tocopy", "_to_copy", "clone",
    "contiguous", "fill", "zero", "zeros", "zeros_like", "ones", "ones_like", "full", "where", "masked_fill",
    "clamp", "clamp_min", "addcmul", "addcdiv", "lerp", "maximum", "minimum", "abs", "type_as", "index",
    "index_select", "gather", "scatter", "softmax", "_softmax", "threshold", "isin", "argmax", "cumsum",
}
_ELEMENTWISE = re.compile(r"norm|silu|swiglu|rope|rotary|elementwise|reduce_kernel|catarraybatchedcopy|triton_poi"
                          r"|triton_red")


def _normalise_op(name: str) -> str:
    """'aten::mul_' -> 'mul'; 'autograd::engine::evaluate_function: MmBackward0' -> 'mm'."""
    n = name.rsplit(": ", 1)[-1].strip().lower()
    n = n.removeprefix("aten::").removeprefix("torch::autograd::")
    n = re.sub(r"backward\d*$", "", n)
    return n.rstrip("_") or n


def classify_op(names: list[str]) -> str:
    """The group of an op from its name and the names of the ops it ran inside (innermost first).

    The enclosing ops decide in this order: optimizer (anything under Optimizer.step/zero_grad),
    attention (anything under SDPA, so its math path's bmm/softmax count as attention), GEMM
    (matmul/linear and what runs inside them), loss (labels or ops with 'loss', cross-entropy,
    log-softmax), elementwise; whatever matches none is 'other'."""
    norm = [_normalise_op(n) for n in names]
    if any(_OPTIMIZER.search(n) for n in norm):
        return "optimizer"
    if any(_ATTENTION.search(n) for n in norm):
        return "attention"
    if any(_GEMM.search(n) for n in norm):
        return "gemm"
    if any(_LOSS.search(n) for n in norm):
        return "loss"
    if any(n in _ELEMENTWISE_OPS or _ELEMENTWISE.search(n) for n in norm):
        return "elementwise"
    return "other"


def _chain(evt) -> list[str]:
    names = []
    while evt is not None:
        names.append(evt.name)
        evt = evt.cpu_parent
    return names


def _shares(totals: dict[str, float], total: float) -> dict:
    return {g: {"ms": round(totals.get(g, 0.0) / 1e3, 3),
                "percent": round(100 * totals.get(g, 0.0) / total, 2) if total > 0 else 0.0}
            for g in PROFILE_GROUPS}


def _top(per_op: dict, key: str, total: float, top: int) -> list[dict]:
    rows = sorted(((k, d) for k, d in per_op.items() if d[key] > 0), key=lambda kv: -kv[1][key])[:top]
    return [{"op": name, "group": group, "calls": d["calls"], "self_ms": round(d[key] / 1e3, 3),
             "percent": round(100 * d[key] / total, 2) if total > 0 else 0.0} for (name, group), d in rows]


def profile_ops(fn: Callable[[], object], steps: int, device: torch.device, top: int = 15,
                label: str = "step") -> dict:
    """Run `fn()` `steps` times under torch.profiler and say where the time went.

    Self time of every op (time in the op itself, not in the ops it calls) is summed by op name
    and group (`top_cpu`, and `top_cuda` on a GPU: device time of the kernels an op launched; the same
    op name can appear under two groups, e.g. aten::mul in the model and in AdamW) and by group
    (`groups_cpu` / `groups_cuda`, see `classify_op`; the groups add up to the total). Each call of
    `fn` runs inside a `label` range, whose own self time (Python between ops) lands in 'other'."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(label):
                fn()
        if cuda:
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0

    per_op: dict = defaultdict(lambda: {"calls": 0, "cpu_us": 0.0, "cuda_us": 0.0})  # (name, group) -> totals
    cpu_groups: dict = defaultdict(float)
    cuda_groups: dict = defaultdict(float)
    events = list(prof.events())
    for e in events:
        if e.device_type != DeviceType.CPU or e.is_async:
            continue
        chain = _chain(e)
        group = classify_op(chain)
        d = per_op[(e.name, group)]
        d["calls"] += 1
        d["cpu_us"] += e.self_cpu_time_total
        cpu_groups[group] += e.self_cpu_time_total
        for k in getattr(e, "kernels", []):  # device kernels this op launched itself
            kgroup = classify_op([k.name] + chain)
            per_op[(e.name, kgroup)]["cuda_us"] += k.duration
            cuda_groups[kgroup] += k.duration
    cpu_total = sum(cpu_groups.values())
    out = {
        "steps": steps,
        "label": label,
        "wall_seconds": round(wall, 4),
        "activities": ["cpu"] + (["cuda"] if cuda else []),
        "self_cpu_total_ms": round(cpu_total / 1e3, 3),
        "groups_cpu": _shares(cpu_groups, cpu_total),
        "top_cpu": _top(per_op, "cpu_us", cpu_total, top),
        "group_notes": PROFILE_GROUP_NOTES,
    }
    if cuda:
        device_events = sum(e.time_range.elapsed_us() for e in events
                            if e.device_type != DeviceType.CPU and not e.is_async)
        attributed = sum(cuda_groups.values())
        if device_events > attributed:  # kernels no profiled CPU op claimed (rare): counted, as 'other'
            cuda_groups["other"] += device_events - attributed
        cuda_total = sum(cuda_groups.values())
        out.update({"self_cuda_total_ms": round(cuda_total / 1e3, 3),
                    "cuda_unattributed_ms": round(max(0.0, device_events - attributed) / 1e3, 3),
                    "groups_cuda": _shares(cuda_groups, cuda_total),
                    "top_cuda": _top(per_op, "cuda_us", cuda_total, top)})
    return out


def format_profile(p: dict) -> str:
    """One line per group: 'gemm 61.2% | attention 9.8% | ...' (CPU, and CUDA when there)."""
    lines = []
    for kind in ("cpu", "cuda"):
        g = p.get(f"groups_{kind}")
        if g:
            lines.append(f"{kind}: " + " | ".join(f"{k} {v['percent']:.1f}%" for k, v in g.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Command lines: option values checked while parsing (with lora_mem.cli's Parser, one error line naming the option)
# ---------------------------------------------------------------------------------------------------------------------


DTYPE_NAMES = ("float32", "bfloat16", "float16")
