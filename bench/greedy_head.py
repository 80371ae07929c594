"""The greedy LM head: one (B, C) x (C, V) product and argmax against the product in vocabulary slices.

model.generate picks each row's next token with `greedy_tokens`; on CPU it takes the LM head
`CPU_VOCAB_SLICE` vocabulary rows at a time. This measures that choice on the default model's head
shape (vocab 49152, hidden 576; random values: speed does not depend on them), at decode batch
sizes, for several slice sizes, as ratios to the single product in the same run, and checks that
every slice size picks the same tokens.

    python -m bench.greedy_head                       # -> bench/results/greedy_head_cpu.json
    python -m bench.greedy_head --batch-sizes 64 --slices 2048,4096 --repeats 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.common import atomic_write_json, device_slug, run_info
from model.generate import CPU_VOCAB_SLICE, greedy_tokens

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def median_seconds_interleaved(fns: list, repeats: int, device: torch.device) -> list[float]:
    """Median time of each function, the functions taking turns within every repeat, so a shared
    machine's drifting load falls on all of them alike."""
    for fn in fns:  # warm-up
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--slices", default="1024,2048,4096,8192,16384")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/greedy_head_<device>.json")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    slices = [int(s) for s in args.slices.split(",")]

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(args.vocab, args.hidden, generator=g).to(device, dtype)
    rows = []
    for b in batch_sizes:
        hidden = torch.randn(b, args.hidden, generator=g).to(device, dtype)
        reference = greedy_tokens(hidden, weight, None)
        variants = [None] + slices  # None: one product
        seconds = median_seconds_interleaved(
            [lambda s=s: greedy_tokens(hidden, weight, s) for s in variants], args.repeats, device)
        one_product = seconds[0]
        row = {"batch": b, "one_product_ms": round(one_product * 1e3, 3), "slices": []}
        for s, t in zip(slices, seconds[1:]):
            same = bool(torch.equal(greedy_tokens(hidden, weight, s), reference))
            row["slices"].append({"vocab_slice": s, "ms": round(t * 1e3, 3),
                                  "speedup_vs_one_product": round(one_product / t, 3), "same_tokens": same})
        rows.append(row)
        best = max(row["slices"], key=lambda r: r["speedup_vs_one_product"])
        print(f"batch {b}: one product {row['one_product_ms']:.2f} ms; best slice {best['vocab_slice']} "
              f"{best['ms']:.2f} ms ({best['speedup_vs_one_product']:.2f}x); "
              + ", ".join(f"{r['vocab_slice']}: {r['speedup_vs_one_product']:.2f}x" for r in row["slices"]))

    result = {
        "benchmark": "greedy_head",
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **run_info(device),
        "dtype": args.dtype,
        "shape": {"vocab": args.vocab, "hidden": args.hidden},
        "repeats": args.repeats,
        "timing": "median of --repeats calls after one warm-up, the variants taking turns within each repeat",
        "engine_cpu_vocab_slice": CPU_VOCAB_SLICE,
        "rows": rows,
        "loadavg_end": list(os.getloadavg()),
    }
    out = args.out or RESULTS_DIR / f"greedy_head_{device_slug(device)}.json"
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
