"""Answering every conversation's questions with its own adapter: shared batches against one adapter at a time.

    one_at_a_time   for each conversation: load its adapter, answer its questions in batches of B
    shared          stack all adapters once, answer all questions in batches of B, each row with its
                    conversation's adapter (lora_mem.lora_core.multi_adapter, lora_mem/kernels/multi_lora_linear.py)

Same prompts (LoCoMo questions, the chat template bench.locomo asks with), same greedy decoding, same
batch size. Reports questions/s of both, their ratio, and whether every answer is identical token for
token (it should be: the shared path is the same computation, regrouped).

    python -m bench.perf.shared_batches --adapters-from runs/locomo-r8        # the adapters a LoCoMo run trained
    python -m bench.perf.shared_batches --random-adapters --rank 8            # seeded random adapters (no run needed)

Output: bench/results/shared_batches_<device>.json (atomically), and a line per side on stdout.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, atomic_write_json, device_slug, run_info
from bench.perf.timing import DTYPE_NAMES, sync
from bench.locomo_data import iter_samples, load_locomo, resolve_data_path, select_questions
from lora_mem.lora_core.adapter_io import load_adapter, save_adapter
from lora_mem.lora_core.inject import LoRAConfig, inject_lora, lora_modules
from lora_mem.cli import Parser, device_name, id_list, positive_int
from lora_mem.kernels.policy import DTYPE_DEFAULT_HELP
from lora_mem.lora_core.memory import QUESTION_TEMPLATE
from lora_mem.lora_core.multi_adapter import stack_adapters, unstack_adapters
from lora_mem.model.generate import generate
from lora_mem.model.loader import load_model


def random_adapters(lm, sample_ids: list[str], rank: int, out: Path) -> list[Path]:
    """One seeded random adapter per conversation (B non-zero, so each changes the answers)."""
    cfg = LoRAConfig(rank=rank)
    if not lora_modules(lm.model):
        inject_lora(lm.model, cfg)
    dirs = []
    for i, sid in enumerate(sample_ids):
        g = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for m in lora_modules(lm.model).values():
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) / math.sqrt(m.in_features))
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.02)
        dirs.append(save_adapter(lm.model, out / sid, cfg, base_model=lm.name))
    return dirs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = Parser(prog="python -m bench.perf.shared_batches", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="packaged name, local checkpoint dir or hub id")
    ap.add_argument("--data", default=None, help="locomo10.json (else $LOCOMO_DATA, the cache, or a download)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapters-from", metavar="RUN_DIR", help="a bench.locomo run: RUN_DIR/adapters/<sample_id>")
    src.add_argument("--random-adapters", action="store_true", help="seeded random adapters of --rank")
    ap.add_argument("--rank", type=positive_int, default=8, help="rank of the random adapters")
    ap.add_argument("--conversations", type=id_list, default=None, help="comma-separated sample ids (default: all)")
    ap.add_argument("--batch-size", type=positive_int, default=64, help="questions decoded at once")
    ap.add_argument("--max-new-tokens", type=positive_int, default=32, help="the longest answer, in tokens")
    ap.add_argument("--device", type=device_name, default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    ap.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help=DTYPE_DEFAULT_HELP)
    ap.add_argument("--out", default=None, help="results file (default bench/results/shared_batches_<device>.json)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    samples = load_locomo(resolve_data_path(args.data))
    if args.conversations:
        samples = iter_samples(samples, args.conversations)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    device = lm.model.lm_head.weight.device
    tok = lm.tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        if args.adapters_from:
            dirs = [Path(args.adapters_from) / "adapters" / s.sample_id for s in samples]
            missing = [str(d) for d in dirs if not d.is_dir()]
            if missing:
                sys.exit(f"error: no adapter directory {missing[0]}")
        else:
            dirs = random_adapters(lm, [s.sample_id for s in samples], args.rank, Path(tmp))
        prompts, owners = [], []
        for i, s in enumerate(samples):
            for q in select_questions(s):
                prompts.append(tok.encode_chat([{"role": "user", "content": QUESTION_TEMPLATE.format(question=q.question)}]))
                owners.append(i)
        decode = dict(max_new_tokens=args.max_new_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id,
                      batch_size=args.batch_size)

        # Warm-up (allocator, kernels, autotune) on a few questions, then one timed pass per side.
        load_adapter(lm.model, dirs[0])
        generate(lm.model, prompts[:8], **decode)

        sync(device)
        t0 = time.perf_counter()
        single: list = [None] * len(prompts)
        for i, d in enumerate(dirs):
            load_adapter(lm.model, d)
            mine = [j for j, o in enumerate(owners) if o == i]
            for j, out in zip(mine, generate(lm.model, [prompts[j] for j in mine], **decode)):
                single[j] = out
        sync(device)
        single_s = time.perf_counter() - t0

        stack_adapters(lm.model, dirs)
        generate(lm.model, prompts[:8], adapter_ids=owners[:8], **decode)  # warm-up of the stacked path
        sync(device)
        t0 = time.perf_counter()
        shared = generate(lm.model, prompts, adapter_ids=owners, **decode)
        sync(device)
        shared_s = time.perf_counter() - t0
        unstack_adapters(lm.model)

    n = len(prompts)
    differing = sum(a != b for a, b in zip(single, shared))
    result = {
        "benchmark": "shared_batches",
        **run_info(device),
        "dtype": str(lm.model.lm_head.weight.dtype).replace("torch.", ""),
        "command": "python -m bench.perf.shared_batches " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": lm.name,
        "adapters": args.adapters_from or f"random r={args.rank}",
        "conversations": len(samples),
        "questions": n,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "one_at_a_time": {"seconds": single_s, "questions_per_second": n / single_s,
                          "generated_tokens": sum(len(o) for o in single)},
        "shared": {"seconds": shared_s, "questions_per_second": n / shared_s,
                   "generated_tokens": sum(len(o) for o in shared)},
        "shared_speedup": single_s / shared_s,
        "identical_answers": n - differing,
        "differing_answers": differing,
    }
    path = Path(args.out) if args.out else RESULTS_DIR / f"shared_batches_{device_slug(device)}.json"
    atomic_write_json(path, result)
    print(f"one adapter at a time: {n / single_s:7.2f} questions/s ({single_s:.1f} s)")
    print(f"shared batches:        {n / shared_s:7.2f} questions/s ({shared_s:.1f} s)  "
          f"{single_s / shared_s:.2f}x; identical answers {n - differing}/{n}")
    print(f"results: {path}")
    return result


if __name__ == "__main__":
    main()
