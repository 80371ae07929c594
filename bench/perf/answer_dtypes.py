"""LoCoMo answering in fp32 against bf16, without and with retrieval, side by side in one run.

The same questions of one conversation are answered as bench.locomo answers them (`bench.locomo.question_prompts`:
the question alone, or with the BM25-retrieved turns ahead of it, the `rag` method), by the default model loaded in
each dtype (bf16: base weights, activations and KV cache in bf16, the adapter's A/B in fp32: the kernel policy's
bf16 CPU path), optionally with a saved adapter in both. The dtypes take turns within each round (fp32 then bf16,
then bf16 then fp32, ...), so a shared machine's drift falls on both; each reports questions/s (median over rounds),
the ratio, and how many answers the two dtypes give alike.

    python -m bench.perf.answer_dtypes --adapter runs/dev-queries/adapters/conv-26     # -> bench/results/answer_dtypes_cpu.json
    python -m bench.perf.answer_dtypes --questions 8 --rounds 1                          # a CPU without bf16 instructions

On a CPU without bf16 instructions bf16 is many times slower (bench.perf.cpu_bf16): ask few questions there.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, atomic_write_json, device_slug, run_info
from bench.perf.timing import DTYPE_NAMES, loadavg
from lora_mem.cli import Parser, id_list, positive_int

MODES = ("direct", "rag")


def main(argv: list[str] | None = None) -> dict:
    ap = Parser(prog="python -m bench.perf.answer_dtypes", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="packaged name, checkpoint directory or hub id")
    ap.add_argument("--data", default=None, help="LoCoMo file (default: $LOCOMO_DATA, the cache, or the download)")
    ap.add_argument("--conversation", default="conv-26", help="the sample_id whose questions are answered")
    ap.add_argument("--questions", type=positive_int, default=64, help="the conversation's first N questions (1-4)")
    ap.add_argument("--adapter", default=None, help="a saved adapter (PEFT format) to answer with in both dtypes")
    ap.add_argument("--dtypes", type=id_list, default="float32,bfloat16", help="comma-separated dtypes, each timed")
    ap.add_argument("--modes", type=id_list, default=",".join(MODES), help="direct (the question alone), rag (BM25 "
                                                                           "top-10 turns ahead of it)")
    ap.add_argument("--rounds", type=positive_int, default=1, help="timed rounds of each (dtype, mode)")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/answer_dtypes_<device>.json")
    args = ap.parse_args(argv)
    dtypes, modes = args.dtypes.split(","), args.modes.split(",")
    for name, values, allowed in (("--dtypes", dtypes, DTYPE_NAMES), ("--modes", modes, MODES)):
        if any(v not in allowed for v in values):
            ap.error(f"{name}: choose from {', '.join(allowed)}, got {','.join(values)}")
    if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
        ap.error(f"--adapter {args.adapter}: no adapter_config.json there")

    from bench import locomo
    from bench.locomo_data import (
        iter_samples,
        load_locomo,
        resolve_data_path,
        select_questions,
    )
    from lora_mem.kernels.policy import KernelPolicy
    from lora_mem.lora_core.adapter_io import load_adapter
    from lora_mem.lora_core.memory import AnswerConfig, answer_prompts
    from lora_mem.model.loader import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        sample = iter_samples(load_locomo(resolve_data_path(args.data)), [args.conversation])[0]
    except (ValueError, OSError) as e:
        ap.error(str(e))
    questions = select_questions(sample, max_questions=args.questions)
    policy = KernelPolicy.from_env()
    models = {}
    for dtype in dtypes:
        lm = load_model(args.model, device="cpu", dtype=dtype, policy=policy)
        if args.adapter:
            load_adapter(lm.model, args.adapter)
        models[dtype] = lm
    cfg = AnswerConfig()
    results = {"benchmark": "LoCoMo answering, fp32 against bf16, without and with retrieval, in turns",
               **run_info(torch.device("cpu"), policy), "model": args.model, "conversation": args.conversation,
               "questions": len(questions), "adapter": args.adapter, "rounds": args.rounds,
               "answer_config": {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size,
                                 "memory_budget_mb": cfg.memory_budget_mb}, "modes": {}}
    for mode in modes:
        config = locomo.LocomoConfig(method="rag" if mode == "rag" else "base")
        prompts = locomo.question_prompts(sample, questions, models[dtypes[0]], config)[0]
        seconds: dict[str, list[float]] = {d: [] for d in dtypes}
        answers: dict[str, list[str]] = {}
        for r in range(args.rounds):
            for dtype in (dtypes if r % 2 == 0 else dtypes[::-1]):
                print(f"[{mode}] {dtype}, round {r + 1} ...", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                answers[dtype] = answer_prompts(models[dtype], prompts, cfg)
                seconds[dtype].append(time.perf_counter() - t0)
        entry = {"prompt_tokens_mean": sum(map(len, prompts)) / len(prompts), "sides": {}}
        for dtype in dtypes:
            s = statistics.median(seconds[dtype])
            entry["sides"][dtype] = {"seconds_median": round(s, 3), "seconds_all": [round(x, 3) for x in seconds[dtype]],
                                     "questions_per_second": round(len(prompts) / s, 4)}
        if len(dtypes) == 2:
            a, b = dtypes
            entry["speedup"] = {f"{b}_vs_{a}": round(entry["sides"][a]["seconds_median"] /
                                                     entry["sides"][b]["seconds_median"], 4)}
            entry["identical_answers"] = sum(x == y for x, y in zip(answers[a], answers[b]))
        results["modes"][mode] = entry
        print(f"[{mode}] " + ", ".join(f"{d} {entry['sides'][d]['questions_per_second']:.3f} q/s" for d in dtypes)
              + (f"; identical answers {entry['identical_answers']}/{len(prompts)}" if "identical_answers" in entry
                 else ""), flush=True)
    results["loadavg_end"] = loadavg()
    out = args.out or RESULTS_DIR / f"answer_dtypes_{device_slug(torch.device('cpu'))}.json"
    atomic_write_json(out, results)
    print(f"results: {out}")
    return results


if __name__ == "__main__":
    main()
