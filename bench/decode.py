"""Greedy decoding speed: lora-mem's `model.generate` against `transformers` `generate`, one run.

Same checkpoint, same machine, same dtype, same prompt token ids on both sides (the prompts are
tokenised once, by lora-mem's tokenizer, and fed to transformers as tensors).

Workloads
---------
single_stream
    Batch 1, a few chat prompts, exactly `--max-new-tokens` new tokens on both sides: EOS is
    disabled (`stop_ids=[]` for lora-mem, `eos_token_id=None` for transformers, which leaves the
    logits untouched, unlike `min_new_tokens`). Reports tokens/s and whether the generated token ids
    are identical (`tokens_match`; greedy, so expected true in fp32).
batched
    `--num-prompts` LoCoMo-style questions of different lengths in the chat format, normal stopping
    at EOS / `<|im_end|>`, `--batched-max-new-tokens` at most. lora-mem `generate(batch_size=B)`
    against transformers at batch 1 (the usual loop) and transformers at batch B with left padding
    and an attention mask. Reports questions/s, tokens/s and the ratios.

Timing: one warm-up generate per side before each workload (excluded), then the median of
`--repeats` (single-stream) / `--batched-repeats` (batched) timed runs; the sides take turns
within each repeat, so a shared machine's changing load hits them alike. transformers runs under
`torch.inference_mode()`; lora-mem is called exactly as the engine calls it. `torch` threads are
left at their default and recorded, as are the CPU model, the load average at start and end
(the machine may be shared), versions, git commit and the command line.

Output: `bench/results/decode_<device>.json` (`decode_<device>_quick.json` with `--quick`), written
atomically, plus a small table on stdout.

    python -m bench.decode                 # the full run (CPU fp32 by default; bf16 on CUDA)
    python -m bench.decode --quick         # a fast smoke run
    python -m bench.decode --device cuda --batch-size 64 --num-prompts 256

transformers is a bench/test-only reference: it is imported here, never from model/ or kernels/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.common import atomic_write_json, cpu_name, device_slug, git_commit, versions
from model.generate import generate
from model.loader import LoadedModel, load_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

SINGLE_STREAM_QUESTIONS = [
    "What is the capital of France?",
    "When did Caroline go to the LGBTQ support group?",
    "What did Melanie paint recently, and why did she choose that subject?",
]

# LoCoMo-style question templates (temporal, single-hop, multi-hop, open-domain), filled with
# LoCoMo-like speakers and topics. Different template lengths give prompts of different lengths.
NAMES = ["Caroline", "Melanie", "Jon", "Gina", "John", "Maria", "Joanna", "Nate",
         "Tim", "Audrey", "Andrew", "Deborah", "Evan", "Sam", "James", "Jolene"]
TOPICS = [
    ("the LGBTQ support group", "painting", "a pottery class"),
    ("the charity race", "running", "a marathon in the city"),
    ("the dance studio opening", "dancing", "a new studio downtown"),
    ("the job interview", "coding", "a startup in Seattle"),
    ("the camping trip", "hiking", "the mountains with the kids"),
    ("the book club", "reading", "a fantasy series"),
    ("the adoption agency", "volunteering", "a shelter for homeless youth"),
    ("the concert", "playing the violin", "an orchestra audition"),
]
TEMPLATES = [
    "When did {n} go to {a}?",
    "What does {n} like doing?",
    "How long has {n} been interested in {b}?",
    "Where did {n} go after visiting {a} last month, and who came along?",
    "What did {n} say about {c}?",
    "Would {n} likely enjoy {c}, given what they said about {b} in their conversations?",
    "Who did {n} meet at {a}?",
    "What gift did {n} receive after {a}, and from whom did it come?",
]


def batched_questions(n: int) -> list[str]:
    """`n` distinct LoCoMo-style questions (deterministic), cycling templates, names and topics."""
    out = []
    i = 0
    while len(out) < n:
        t = TEMPLATES[i % len(TEMPLATES)]
        name = NAMES[(i // len(TEMPLATES) + i) % len(NAMES)]
        a, b, c = TOPICS[(i * 3 + i // len(TOPICS)) % len(TOPICS)]
        q = t.format(n=name, a=a, b=b, c=c)
        if i >= len(TEMPLATES) * len(NAMES):  # past the distinct combinations: still distinct
            q = f"{q} (#{i})"
        out.append(f"Answer in a few words. Question: {q}")
        i += 1
    return out


# ---------------------------------------------------------------------------------------------
# Machine and run metadata
# ---------------------------------------------------------------------------------------------

def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# The two sides
# ---------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_reference(path: Path, device: torch.device, dtype: torch.dtype):
    """The same checkpoint through transformers (eval, no grad), in the same dtype on the same device."""
    import transformers
    from transformers import AutoModelForCausalLM

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    ref = AutoModelForCausalLM.from_pretrained(str(path), **{dtype_kw: dtype})
    ref.to(device).eval().requires_grad_(False)
    return ref


def cut_at_stop(row: list[int], stop_ids: list[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in stop_ids:
            return row[:i]
    return row


def hf_generate(ref, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int,
                batch_size: int, device: torch.device) -> list[list[int]]:
    """Greedy continuations from transformers, `batch_size` prompts at a time with left padding.

    `stop_ids=[]` disables EOS entirely (eos_token_id=None: no stopping and no logit processing),
    so exactly `max_new_tokens` tokens come back; otherwise rows are cut before their first stop id.
    """
    results: list[list[int]] = []
    eos = list(stop_ids) if stop_ids else None
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            T = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), T), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[i, T - len(p):] = 1
            out = ref.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=eos, pad_token_id=pad_id,
                temperature=None, top_p=None, top_k=None,
            )
            for row in out[:, T:].tolist():
                results.append(cut_at_stop(row, stop_ids))
    return results


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


def side_row(times: list[float], n_tokens: int, n_questions: int) -> dict:
    med = statistics.median(times)
    return {
        "seconds_median": round(med, 4),
        "seconds_all": [round(t, 4) for t in times],
        "generated_tokens": n_tokens,
        "tokens_per_s": round(n_tokens / med, 3),
        "questions": n_questions,
        "questions_per_s": round(n_questions / med, 4),
    }


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 else None


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------

def chat_prompts(lm: LoadedModel, questions: list[str]) -> list[list[int]]:
    tok = lm.tokenizer
    if tok.im_start_id is not None:
        return [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    return [tok.encode(q) for q in questions]


def run_single_stream(lm: LoadedModel, ref, args, device: torch.device, log) -> dict:
    tok, model = lm.tokenizer, lm.model
    questions = SINGLE_STREAM_QUESTIONS[: args.single_prompts]
    prompts = chat_prompts(lm, questions)
    n_new = args.max_new_tokens

    def ours():
        return [generate(model, [p], n_new, stop_ids=[], pad_id=tok.pad_id, batch_size=1)[0] for p in prompts]

    def theirs():
        return [hf_generate(ref, [p], n_new, [], tok.pad_id, 1, device)[0] for p in prompts]

    log(f"single_stream: {len(prompts)} prompt(s) x {n_new} tokens, batch 1, EOS disabled, {args.repeats} repeat(s)")
    load_before = loadavg()
    generate(model, prompts[:1], min(8, n_new), stop_ids=[], pad_id=tok.pad_id, batch_size=1)  # warm-ups
    hf_generate(ref, prompts[:1], min(8, n_new), [], tok.pad_id, 1, device)
    (ours_t, ours_out), (theirs_t, theirs_out) = timed([ours, theirs], args.repeats, device)
    log(f"  lora-mem      {statistics.median(ours_t):8.2f} s")
    log(f"  transformers  {statistics.median(theirs_t):8.2f} s")

    n_ours = sum(len(o) for o in ours_out)
    n_theirs = sum(len(o) for o in theirs_out)
    row = {
        "workload": "single_stream",
        "batch_size": 1,
        "num_prompts": len(prompts),
        "prompt_tokens": [len(p) for p in prompts],
        "max_new_tokens": n_new,
        "eos": "disabled (stop_ids=[] / eos_token_id=None)",
        "repeats": args.repeats,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "lora_mem": side_row(ours_t, n_ours, len(prompts)),
        "transformers": side_row(theirs_t, n_theirs, len(prompts)),
        "tokens_match": ours_out == theirs_out,
        "prompts_matching": sum(a == b for a, b in zip(ours_out, theirs_out)),
        "sample_output": tok.decode(ours_out[0]),
    }
    if not row["tokens_match"]:
        row["first_mismatch"] = [
            {"prompt": i, "position": next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))}
            for i, (a, b) in enumerate(zip(ours_out, theirs_out)) if a != b
        ]
    row["ratio_tokens_per_s"] = ratio(row["lora_mem"]["tokens_per_s"], row["transformers"]["tokens_per_s"])
    return row


def run_batched(lm: LoadedModel, ref, args, device: torch.device, log) -> dict:
    tok, model = lm.tokenizer, lm.model
    questions = batched_questions(args.num_prompts)
    prompts = chat_prompts(lm, questions)
    B, n_new, stop, pad = args.batch_size, args.batched_max_new_tokens, tok.stop_ids, tok.pad_id
    reps = args.batched_repeats
    log(f"batched: {len(prompts)} questions, prompt tokens {min(map(len, prompts))}..{max(map(len, prompts))}, "
        f"max_new_tokens {n_new}, stop at {stop}, {reps} repeat(s)")

    def ours():
        return generate(model, prompts, n_new, stop_ids=stop, pad_id=pad, batch_size=B)

    def hf(bs):
        return lambda: hf_generate(ref, prompts, n_new, stop, pad, bs, device)

    load_before = loadavg()
    warm = prompts[:B]
    generate(model, warm, min(4, n_new), stop_ids=stop, pad_id=pad, batch_size=B)  # warm-ups
    hf_generate(ref, warm[:1], min(4, n_new), stop, pad, 1, device)
    hf_generate(ref, warm, min(4, n_new), stop, pad, B, device)
    (ours_t, ours_out), (hf1_t, hf1_out), (hfb_t, hfb_out) = timed([ours, hf(1), hf(B)], reps, device)
    log(f"  lora-mem batch {B:<4}       {statistics.median(ours_t):8.2f} s")
    log(f"  transformers batch 1       {statistics.median(hf1_t):8.2f} s")
    log(f"  transformers batch {B:<4}   {statistics.median(hfb_t):8.2f} s")

    def count(outs):
        return sum(len(o) for o in outs)

    n = len(prompts)
    row = {
        "workload": "batched",
        "num_prompts": n,
        "batch_size": B,
        "prompt_tokens": {"min": min(map(len, prompts)), "max": max(map(len, prompts)),
                          "mean": round(sum(map(len, prompts)) / n, 1)},
        "max_new_tokens": n_new,
        "stop_ids": list(stop),
        "repeats": reps,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "lora_mem_batched": side_row(ours_t, count(ours_out), n),
        "transformers_batch1": side_row(hf1_t, count(hf1_out), n),
        "transformers_batched": side_row(hfb_t, count(hfb_out), n),
        # Greedy answers should agree; padded batches may flip near-ties (different matmul shapes).
        "answers_match_transformers_batch1": sum(a == b for a, b in zip(ours_out, hf1_out)),
        "answers_match_transformers_batched": sum(a == b for a, b in zip(ours_out, hfb_out)),
        "sample_answers": [{"question": q, "answer": tok.decode(o)} for q, o in list(zip(questions, ours_out))[:3]],
    }
    q = {k: row[k]["questions_per_s"] for k in ("lora_mem_batched", "transformers_batch1", "transformers_batched")}
    row["ratio_questions_per_s_vs_transformers_batch1"] = ratio(q["lora_mem_batched"], q["transformers_batch1"])
    row["ratio_questions_per_s_vs_transformers_batched"] = ratio(q["lora_mem_batched"], q["transformers_batched"])
    return row


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.decode",
        description="Greedy decoding speed of lora-mem vs transformers generate (same model, dtype, machine).",
    )
    ap.add_argument("--model", default="smollm2-135m-instruct", help="packaged name, checkpoint dir or hub id")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--workload", choices=["all", "single", "batched"], default="all", help="what to run (default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="single-stream new tokens, EOS disabled (default 64; quick 16)")
    ap.add_argument("--single-prompts", type=int, default=None,
                    help=f"single-stream prompts, at most {len(SINGLE_STREAM_QUESTIONS)} (default all; quick 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed single-stream runs, median reported (default 3; quick 1)")
    ap.add_argument("--num-prompts", type=int, default=None, help="batched: number of questions (default 64; quick 8)")
    ap.add_argument("--batch-size", type=int, default=None, help="batched: lora-mem and transformers batch size (default 64; quick 8)")
    ap.add_argument("--batched-max-new-tokens", type=int, default=None, help="batched: max new tokens per answer (default 32; quick 8)")
    ap.add_argument("--batched-repeats", type=int, default=None, help="timed batched runs, median reported (default 1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for both sides (default: leave torch's default; recorded either way). "
                         "On a shared CPU, fewer threads than cores avoids OpenMP stalls when a core is taken")
    ap.add_argument("--quick", action="store_true", help="fewer prompts and tokens: a fast smoke run")
    ap.add_argument("--out", default=None, help="output JSON (default bench/results/decode_<device>[_quick].json)")
    args = ap.parse_args(argv)
    defaults = dict(max_new_tokens=64, single_prompts=len(SINGLE_STREAM_QUESTIONS), repeats=3, num_prompts=64,
                    batch_size=64, batched_max_new_tokens=32, batched_repeats=1)
    if args.quick:
        defaults.update(max_new_tokens=16, single_prompts=1, repeats=1, num_prompts=8, batch_size=8,
                        batched_max_new_tokens=8)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.single_prompts = max(1, min(args.single_prompts, len(SINGLE_STREAM_QUESTIONS)))
    for k in ("max_new_tokens", "repeats", "num_prompts", "batch_size", "batched_max_new_tokens", "batched_repeats"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1")
    return args


def print_table(result: dict) -> None:
    print(f"\n{result['model']} on {result['device_name']} ({result['dtype']}, torch {result['versions']['torch']}, "
          f"transformers {result['versions']['transformers']}, {result['cpu']['torch_num_threads']} threads, "
          f"load {result['loadavg_start']} -> {result['loadavg_end']})")
    print(f"{'workload':<34}{'seconds':>10}{'tokens/s':>12}{'questions/s':>13}{'ratio':>9}")
    for w in result["workloads"]:
        if w["workload"] == "single_stream":
            sides = [("lora-mem", w["lora_mem"], None),
                     ("transformers", w["transformers"], w["ratio_tokens_per_s"])]
            title = f"single_stream (bs 1, {w['max_new_tokens']} tok)"
        else:
            sides = [(f"lora-mem bs {w['batch_size']}", w["lora_mem_batched"], None),
                     ("transformers bs 1", w["transformers_batch1"], w["ratio_questions_per_s_vs_transformers_batch1"]),
                     (f"transformers bs {w['batch_size']}", w["transformers_batched"],
                      w["ratio_questions_per_s_vs_transformers_batched"])]
            title = f"batched ({w['num_prompts']} q, <= {w['max_new_tokens']} tok)"
        print(title)
        for name, s, r in sides:
            rs = f"{r:>8.2f}x" if r is not None else f"{'':>9}"
            print(f"  {name:<32}{s['seconds_median']:>10.2f}{s['tokens_per_s']:>12.1f}{s['questions_per_s']:>13.2f}{rs}")
        if w["workload"] == "single_stream":
            print(f"  tokens_match: {w['tokens_match']}")
        else:
            print(f"  answers equal to lora-mem: transformers bs 1 {w['answers_match_transformers_batch1']}/{w['num_prompts']}, "
                  f"bs {w['batch_size']} {w['answers_match_transformers_batched']}/{w['num_prompts']}")
    print("(ratio = lora-mem / that transformers row)")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    default_threads = torch.get_num_threads()
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    command = " ".join(["python -m bench.decode"] + (sys.argv[1:] if argv is None else list(argv)))
    load_start = loadavg()
    started = datetime.now(timezone.utc)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    device = lm.model.lm_head.weight.device
    dtype = lm.model.lm_head.weight.dtype
    ref = load_reference(lm.path, device, dtype)
    log(f"loaded {args.model} ({lm.path}) on {device} in {str(dtype).removeprefix('torch.')}")

    workloads = []
    if args.workload in ("all", "single"):
        workloads.append(run_single_stream(lm, ref, args, device, log))
    if args.workload in ("all", "batched"):
        workloads.append(run_batched(lm, ref, args, device, log))

    slug = device_slug(device)
    result = {
        "benchmark": "decode",
        "created_utc": started.isoformat(timespec="seconds"),
        "duration_s": round((datetime.now(timezone.utc) - started).total_seconds(), 1),
        "command": command,
        "quick": args.quick,
        "model": args.model,
        "checkpoint": str(lm.path),
        "device": slug,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": versions(),
        "transformers_attn_implementation": getattr(ref.config, "_attn_implementation", None),
        "cpu": {"model_name": cpu_name(), "os_cpu_count": os.cpu_count(),
                "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                "torch_num_threads": torch.get_num_threads(),
                "torch_default_num_threads": default_threads,
                "torch_num_interop_threads": torch.get_num_interop_threads()},
        "git_commit": git_commit(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "workloads": workloads,
    }
    out = Path(args.out) if args.out else RESULTS_DIR / f"decode_{slug}{'_quick' if args.quick else ''}.json"
    atomic_write_json(out, result)
    print_table(result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
