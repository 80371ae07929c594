"""Does this CPU run bf16 faster than fp32? Its bf16 instructions and the GEMM rates of both, side by side.

The kernel policy builds CPU models in bf16 only where the CPU has bf16 matrix instructions (avx512_bf16 or AMX:
lora_mem.kernels.policy.cpu_bf16_instructions): elsewhere torch converts bf16 operands to fp32 and back around its
kernels, which costs more than the halved memory traffic saves. This records what the policy read (the CPU's flags,
torch's CPU capability, the bf16 instructions found, the policy's choice) and times torch.mm in fp32 and in bf16 at
the default model's projection shapes (tokens x hidden @ hidden x intermediate, and back), the two dtypes taking
turns within each repeat (bench.perf.timing.timed), so the ratio compares the same moments of a shared machine.

    python -m bench.perf.cpu_bf16                     # -> bench/results/cpu_bf16.json
    python -m bench.perf.cpu_bf16 --tokens 512,2048 --repeats 5
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, atomic_write_json, run_info
from bench.perf.timing import loadavg, saved_ms, timed
from lora_mem.cli import Parser, positive_int, positive_int_list
from lora_mem.kernels import policy as kernel_policy
from lora_mem.kernels.policy import KernelPolicy


def gemm_rates(m: int, k: int, n: int, repeats: int, device: torch.device) -> dict:
    """fp32 and bf16 torch.mm of (m, k) @ (k, n), in turns; GFLOP/s of each and bf16's speed-up."""
    g = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(m, k, generator=g).to(device), torch.randn(k, n, generator=g).to(device)
    a16, b16 = a32.to(torch.bfloat16), b32.to(torch.bfloat16)
    fns = [lambda: torch.mm(a32, b32), lambda: torch.mm(a16, b16)]
    for fn in fns:  # warm-up
        fn()
    (t32, _), (t16, _) = timed(fns, repeats, device)
    s32, s16 = statistics.median(t32), statistics.median(t16)
    flops = 2.0 * m * k * n
    return {"shape": [m, k, n], "fp32_ms": saved_ms(s32), "bf16_ms": saved_ms(s16),
            "fp32_gflops": round(flops / s32 / 1e9, 2), "bf16_gflops": round(flops / s16 / 1e9, 2),
            "bf16_speedup": round(s32 / s16, 4), "fp32_ms_all": [saved_ms(t) for t in t32],
            "bf16_ms_all": [saved_ms(t) for t in t16]}


def build_parser() -> Parser:
    ap = Parser(prog="python -m bench.perf.cpu_bf16", description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=positive_int_list, default=[2048], help="GEMM rows (tokens of a pass)")
    ap.add_argument("--hidden", type=positive_int, default=576, help="the default model's hidden size")
    ap.add_argument("--intermediate", type=positive_int, default=1536, help="the default model's MLP width")
    ap.add_argument("--repeats", type=positive_int, default=3, help="timed repeats of each product (median)")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/cpu_bf16.json")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    policy = KernelPolicy.from_args(args)  # what a command line here would run: its LORA_MEM_* over the defaults
    rows = []
    for m in args.tokens:
        for k, n in ((args.hidden, args.intermediate), (args.intermediate, args.hidden)):
            row = gemm_rates(m, k, n, args.repeats, device)
            rows.append(row)
            print(f"{m}x{k} @ {k}x{n}: fp32 {row['fp32_gflops']:8.1f} GFLOP/s, bf16 {row['bf16_gflops']:8.1f} "
                  f"GFLOP/s, bf16 {row['bf16_speedup']:.3f}x fp32", flush=True)
    results = {
        "benchmark": "fp32 against bf16 torch.mm on this CPU, and what the kernel policy chose from its instructions",
        **run_info(device, policy), "loadavg_end": loadavg(), "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_instructions": list(kernel_policy.cpu_bf16_instructions()),
        "policy_cpu_bf16": policy.cpu_bf16, "default_cpu_dtype": str(policy.default_dtype(device)).removeprefix("torch."),
        "repeats": args.repeats, "gemms": rows,
        "bf16_speedup_median": statistics.median(r["bf16_speedup"] for r in rows),
    }
    out = args.out or RESULTS_DIR / "cpu_bf16.json"
    atomic_write_json(out, results)
    print(f"bf16 instructions: {', '.join(kernel_policy.cpu_bf16_instructions()) or 'none'} (torch capability "
          f"{results['torch_cpu_capability']}); policy: CPU models in {results['default_cpu_dtype']}")
    print(f"results: {out}")
    return results


if __name__ == "__main__":
    main()
