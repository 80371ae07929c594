"""Causal attention forward + backward: PyTorch's SDPA against lora-mem's block-causal GEMMs, side by side.

    python -m bench.perf.attention                          # the default model's heads (9 / 3, head_dim 64), CPU fp32
    python -m bench.perf.attention --seq-lens 512 --blocks 64,128,256 --repeats 9

For every sequence length: SDPA with GQA inside the kernel (`enable_gqa=True`, what the model calls), SDPA
with key/value heads repeated (what transformers' eager-to-SDPA path does), and
`lora_mem.kernels.block_causal_attention` at each block size; each timed forward + backward (what a training step
runs) and forward alone under no_grad (what answering runs). The variants take turns within each repeat
(`bench.perf.timing.timed`), so a change in a shared machine's load hits all alike; the median is reported, and
each block variant's speed-up over the faster SDPA variant. `saved_probs_mb` is what the block path keeps for
backward per layer, in MiB (its price; flash attention keeps one float per row). Writes
bench/results/attention_<device>.json.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import atomic_write_json, device_slug, run_info
from bench.perf.timing import saved_ms, timed
from lora_mem.cli import Parser, device_name, positive_int, positive_int_list
from lora_mem.kernels.block_causal_attention import DEFAULT_BLOCK, block_causal_attention


def saved_probs_bytes(B: int, H: int, T: int, block: int, dtype: torch.dtype) -> int:
    """Bytes of the probabilities the block path keeps for backward: each block's rows x the keys it sees."""
    kept = sum(min(block, T - start) * min(start + block, T) for start in range(0, T, block))
    return B * H * kept * torch.finfo(dtype).bits // 8


def variants(B: int, H: int, Hkv: int, T: int, D: int, blocks: list[int], dtype, device, seed: int = 0):
    """name -> (train: forward + backward, answer: forward under no_grad), all on the same random q, k, v."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, generator=g, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, generator=g, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, H, T, D, generator=g, device=device, dtype=dtype)
    rep = H // Hkv

    def sdpa_gqa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)

    def sdpa_repeat_kv(q, k, v):
        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                              is_causal=True)

    fns = {"sdpa_gqa": sdpa_gqa, "sdpa_repeat_kv": sdpa_repeat_kv}
    for block in blocks:
        fns[f"blocks_{block}"] = lambda q, k, v, block=block: block_causal_attention(q, k, v, block=block)

    def train(fn):
        def run():
            for t in (q, k, v):
                t.grad = None
            fn(q, k, v).backward(grad)
        return run

    def answer(fn):
        def run():
            with torch.no_grad():
                fn(q, k, v)
        return run

    return {name: (train(fn), answer(fn)) for name, fn in fns.items()}


def measure(B: int, H: int, Hkv: int, T: int, D: int, blocks: list[int], dtype, device, repeats: int) -> dict:
    fns = variants(B, H, Hkv, T, D, blocks, dtype, device)
    names = list(fns)
    row = {"batch": B, "heads": H, "kv_heads": Hkv, "seq_len": T, "head_dim": D}
    for kind, index in (("train", 0), ("answer", 1)):
        calls = [fns[n][index] for n in names]
        for call in calls:  # warm-up: allocator, thread pool, first-call dispatch
            call()
        seconds = {n: statistics.median(ts) for n, (ts, _) in zip(names, timed(calls, repeats, device))}
        best_sdpa = min(seconds["sdpa_gqa"], seconds["sdpa_repeat_kv"])
        row[kind] = {n: {"ms_median": saved_ms(s),
                         **({"speedup_vs_best_sdpa": round(best_sdpa / s, 3)} if n.startswith("blocks") else {})}
                     for n, s in seconds.items()}
    row["saved_probs_mb"] = {f"blocks_{b}": round(saved_probs_bytes(B, H, T, b, dtype) / 2**20, 2) for b in blocks}
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = Parser(prog="python -m bench.perf.attention", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", type=positive_int_list, default=[128, 256, 512, 1024],
                    help="comma-separated sequence lengths")
    ap.add_argument("--blocks", type=positive_int_list, default=[64, DEFAULT_BLOCK, 256],
                    help="comma-separated block sizes")
    ap.add_argument("--batch", type=positive_int, default=1, help="sequences per call")
    ap.add_argument("--heads", type=positive_int, default=9, help="query heads (default: the default model's)")
    ap.add_argument("--kv-heads", type=positive_int, default=3, help="key/value heads")
    ap.add_argument("--head-dim", type=positive_int, default=64, help="dimension of a head")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of q, k and v")
    ap.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--repeats", type=positive_int, default=9, help="timed calls per case (median reported)")
    ap.add_argument("--out", default=None, help="results file (default bench/results/attention_<device>.json)")
    args = ap.parse_args(argv)

    seq_lens, blocks = sorted(set(args.seq_lens)), sorted(set(args.blocks))
    if args.heads % args.kv_heads:
        ap.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    info = run_info(device)
    rows = []
    for T in seq_lens:
        rows.append(measure(args.batch, args.heads, args.kv_heads, T, args.head_dim, blocks, dtype, device,
                            args.repeats))
        r = rows[-1]
        print(f"T={T:5d}  train ms: " + "  ".join(f"{n} {v['ms_median']:.2f}" for n, v in r["train"].items())
              + "  | answer ms: " + "  ".join(f"{n} {v['ms_median']:.2f}" for n, v in r["answer"].items()),
              flush=True)
    results = {"benchmark": "causal attention: SDPA vs block-causal GEMMs (lora_mem.kernels.block_causal_attention)",
               "method": "median of --repeats calls, variants interleaved within each repeat (bench.perf.timing.timed), "
                         "one warm-up call each; train = forward + backward, answer = forward under no_grad",
               "dtype": args.dtype, "repeats": args.repeats, "default_block": DEFAULT_BLOCK, **info, "rows": rows}
    out = Path(args.out or Path("bench/results") / f"attention_{device_slug(device)}.json")
    atomic_write_json(out, results)
    print(f"results: {out}")
    return results


if __name__ == "__main__":
    main()
