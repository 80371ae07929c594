"""The greedy LM head: one (B, C) x (C, V) product and argmax against the product in vocabulary slices.

lora_mem.model.generate picks each row's next token with `greedy_tokens`; on CPU it takes the LM head
`CPU_VOCAB_SLICE` vocabulary rows at a time (from `CPU_SLICE_MIN_ROWS` rows up). This measures that choice on the default model's head
shape (vocab 49152, hidden 576; random values: speed does not depend on them), at decode batch
sizes, for several slice sizes, as ratios to the single product in the same run, and checks that
every slice size picks the same tokens.

    python -m bench.perf.greedy_head                       # -> bench/results/greedy_head_cpu.json
    python -m bench.perf.greedy_head --batch-sizes 64 --slices 2048,8192 --repeats 20
"""

from __future__ import annotations

import os
import statistics
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, atomic_write_json, device_slug, run_info
from bench.perf.timing import DTYPE_NAMES, saved_ms, timed
from lora_mem.cli import Parser, device_name, positive_int, positive_int_list
from lora_mem.model.generate import CPU_SLICE_MIN_ROWS, CPU_VOCAB_SLICE, greedy_tokens



def main(argv: list[str] | None = None) -> dict:
    ap = Parser(prog="python -m bench.perf.greedy_head", description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=positive_int, default=49152, help="vocabulary size (the default model's)")
    ap.add_argument("--hidden", type=positive_int, default=576, help="hidden size (the default model's)")
    ap.add_argument("--batch-sizes", type=positive_int_list, default=[1, 8, 16, 64],
                    help="comma-separated rows per step")
    ap.add_argument("--slices", type=positive_int_list, default=[1024, 2048, 4096],
                    help="comma-separated vocabulary slice widths")
    ap.add_argument("--repeats", type=positive_int, default=60, help="timed calls per case (median reported)")
    ap.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="dtype of the head and hidden states")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/greedy_head_<device>.json")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    batch_sizes, slices = args.batch_sizes, args.slices

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(args.vocab, args.hidden, generator=g).to(device, dtype)
    rows = []
    for b in batch_sizes:
        hidden = torch.randn(b, args.hidden, generator=g).to(device, dtype)
        variants = [None] + slices  # None: one product
        fns = [lambda s=s: greedy_tokens(hidden, weight, s) for s in variants]
        for fn in fns:  # warm-up
            fn()
        # The variants take turns within each repeat (bench.perf.timing.timed), so drift hits all alike.
        (one_times, reference), *sliced = timed(fns, args.repeats, device)
        one_product = statistics.median(one_times)
        row = {"batch": b, "one_product_ms": saved_ms(one_product), "slices": []}
        for s, (times, tokens) in zip(slices, sliced):
            t = statistics.median(times)
            row["slices"].append({"vocab_slice": s, "ms": saved_ms(t),
                                  "speedup_vs_one_product": round(one_product / t, 3),
                                  "same_tokens": bool(torch.equal(tokens, reference))})
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
        "engine_cpu_slice_min_rows": CPU_SLICE_MIN_ROWS,
        "rows": rows,
        "loadavg_end": list(os.getloadavg()),
    }
    out = args.out or RESULTS_DIR / f"greedy_head_{device_slug(device)}.json"
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
