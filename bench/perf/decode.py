"""Greedy decoding speed: lora-mem's `lora_mem.model.generate` against `transformers` `generate`, one run.

Same checkpoint, same machine, same dtype, same prompt token ids on both sides (the prompts are
tokenised once, by lora-mem's tokenizer, and fed to transformers as tensors).

Workloads (`--workloads`, comma-separated; default `single_stream,batched`; `all` adds `locomo`; `synthetic` alone)
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
    and an attention mask. lora-mem batches continuously: a finished answer's row goes to the next
    question (lora_mem.model.generate.decode_queue; transformers keeps every row to the end of its batch).
    Reports questions/s, tokens/s and the ratios.
locomo
    The LoCoMo answering workload with an adapter: the real questions of categories 1-4
    (`bench.locomo_data.select_questions`, all 10 conversations = 1,540; `--locomo-questions N`
    takes the first N), asked as bench.locomo asks them (lora_mem.lora_core.memory.QUESTION_TEMPLATE
    in a chat turn, `tokenizer.encode_chat`), answered with ONE LoRA adapter (`--adapter DIR`, PEFT format, e.g.
    runs/locomo-r8/adapters/conv-26; without it a seeded random rank-`--random-adapter-rank`
    adapter with non-zero B, saved to a temporary directory, so it runs on any machine).
    lora-mem: `load_model` + `load_adapter` (the unmerged LoRA path bench.locomo answers with) +
    `generate(batch_size=--locomo-batch-size)`. transformers: `AutoModelForCausalLM` from the
    same checkpoint directory + `peft.PeftModel.from_pretrained` on the same adapter files,
    `generate` greedy with the same `--locomo-max-new-tokens` and stop ids, at batch 1 and at
    batch B (left padding + attention mask, in chunks of B of the length-sorted order lora-mem
    takes the questions in, so both pad alike; lora-mem batches continuously, transformers does not). transformers at batch 1 is slow on a CPU: it answers an evenly spaced subset
    of `--hf-bs1-questions` questions and its rate is extrapolated to all of them (recorded:
    `measured_questions`, `extrapolated`). Reports questions/s of each, the ratios beside the
    goals (>= 10x transformers batch 1, >= 2x transformers at the same batch) and how many
    answers are identical token for token. Runs after the other workloads: it puts the adapter
    into both models.
synthetic
    The locomo workload's shape without its text or a tokenizer, for the randomly initialised presets
    (`--model preset:qwen2.5-1.5b`: Qwen2.5-1.5B shapes, seeded, the same weights copied into transformers'
    model; speed does not depend on the values): `--synthetic-questions` prompts of random token ids with
    lengths spread over `--synthetic-prompt-tokens` (default 45-73, the default model's LoCoMo prompts),
    every answer exactly `--synthetic-new-tokens` long (default 32, bench.locomo's cap; EOS disabled), a
    random adapter (or `--adapter`) on both sides, batch `--batch-size`; the same sides, ratios and goals as
    locomo. Answers of the cap's length make its time an upper bound for LoCoMo answering
    (bench.perf.project_locomo uses it so) and leave continuous batching nothing to refill early.

Timing: one warm-up generate per side before each workload (excluded), then the median of
`--repeats` (single-stream) / `--batched-repeats` (batched) timed runs, one timed run for locomo;
the sides take turns within each repeat, so a shared machine's changing load hits them alike.
transformers runs under `torch.inference_mode()`; lora-mem is called exactly as the engine calls
it. `torch` threads are left at their default and recorded, as are the CPU model, the load
average at start and end (the machine may be shared), versions, git commit and the command line.

`--profile`: one more lora-mem call of the batched workload (and of the locomo workload's 4B shortest questions)
under torch.profiler; the workload gets a `profile` section (top ops, self time by group: see
bench.perf.train_throughput.profile_ops).

Output: `bench/results/decode_<device>.json` for the default workloads, `decode_<device>_<workloads>.json`
for any other selection (e.g. `decode_cpu_locomo.json`), `_quick` added with `--quick`; written
atomically, plus a small table on stdout.

    python -m bench.perf.decode                 # single_stream + batched (CPU fp32 by default; bf16 on CUDA)
    python -m bench.perf.decode --quick         # a fast smoke run
    python -m bench.perf.decode --device cuda --batch-size 64 --num-prompts 256
    LOCOMO_DATA=../shared/data/locomo/locomo10.json python -m bench.perf.decode --workloads locomo \\
        --adapter runs/locomo-r8/adapters/conv-26       # -> bench/results/decode_cpu_locomo.json
    python -m bench.perf.decode --model preset:qwen2.5-1.5b --workloads synthetic --hf-bs1-questions 64   # on a GPU

transformers and peft are bench/test-only references: imported here, never from model/ or kernels/.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, atomic_write_json, cpu_name, device_slug, git_commit, versions
from bench.perf.timing import DTYPE_NAMES, format_profile, loadavg, profile_ops, timed
from lora_mem.cli import Parser, device_name, float_in, non_negative_int, positive_int
import lora_mem.model.generate as gen
from lora_mem.model.generate import generate
from lora_mem.model.loader import LoadedModel, load_model

WORKLOADS = ("single_stream", "batched", "synthetic", "locomo")
# What a randomly initialised preset (`--model preset:NAME`, no tokenizer) can run.
TOKENIZER_FREE_WORKLOADS = ("synthetic",)
PRESET_PREFIX = "preset:"
DEFAULT_WORKLOADS = "single_stream,batched"
# Goals for the LoCoMo answering workload, printed beside the measured ratios.
LOCOMO_GOALS = {"vs_transformers_batch1": 10.0, "vs_transformers_batched": 2.0}


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
# The two sides
# ---------------------------------------------------------------------------------------------

def load_reference(path: Path, device: torch.device, dtype: torch.dtype):
    """The same checkpoint through transformers (eval, no grad), in the same dtype on the same device."""
    import transformers
    from transformers import AutoModelForCausalLM

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    ref = AutoModelForCausalLM.from_pretrained(str(path), **{dtype_kw: dtype})
    ref.to(device).eval().requires_grad_(False)
    return ref


def load_random_preset(name: str, device: str | None, dtype: str | None, seed: int = 0):
    """(lora-mem model, transformers model) of the preset shapes `name` (lora_mem.model.config.PRESETS), randomly initialised
    (seeded) with the same weights on both sides: speed does not depend on the values, and a hub checkpoint cannot
    be downloaded everywhere. No tokenizer (`lm.tokenizer` is None): only the synthetic workload runs."""
    from transformers import AutoModelForCausalLM

    from bench.common import hf_config
    from lora_mem.model.config import PRESETS
    from lora_mem.model.loader import parse_dtype
    from lora_mem.model.qwen2 import Qwen2ForCausalLM

    cfg = PRESETS[name]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = parse_dtype(dtype, dev)
    with dev:
        model = Qwen2ForCausalLM(cfg)
        model.init_weights(generator=torch.Generator(dev).manual_seed(seed))
        model.to(dt).requires_grad_(False).eval()
        ref = AutoModelForCausalLM.from_config(hf_config(cfg)).to(dt)
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]:
        raise RuntimeError(f"preset {name}: parameter names differ from transformers' (missing {missing}, "
                           f"unexpected {unexpected})")
    if cfg.tie_word_embeddings:
        ref.tie_weights()
    ref.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=None, config=cfg, path=None, name=f"{PRESET_PREFIX}{name}"), ref


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
    if args.profile:
        row["profile"] = {"what": "one more lora-mem call of this workload", **profile_ops(ours, 1, device, label="generate")}
    return row


def random_adapter(lm: LoadedModel, rank: int, out_dir: Path, seed: int = 0, b_std: float = 0.02) -> Path:
    """A seeded random LoRA adapter of `rank` on every linear layer, saved in PEFT format to `out_dir`.

    A ~ N(0, 1/in), B ~ N(0, b_std^2): B is not zero (as a freshly initialised adapter's would be),
    so the adapter changes the answers and a side that ignored it would disagree with the other.
    The default is about the size of trained adapters (runs/locomo-r8: A std 0.026, B std 0.010)."""
    from lora_mem.lora_core.adapter_io import save_adapter
    from lora_mem.lora_core.inject import LoRAConfig, inject_lora, lora_modules

    cfg = LoRAConfig(rank=rank)
    if not lora_modules(lm.model):
        inject_lora(lm.model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(lm.model).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) / math.sqrt(m.in_features))
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * b_std)
    return save_adapter(lm.model, out_dir, cfg, base_model=lm.name)


def locomo_questions(data: str | None, limit: int | None) -> tuple[Path, list]:
    """(data file, questions): categories 1-4 of every conversation in file order, the first `limit`."""
    from bench.locomo_data import load_locomo, resolve_data_path, select_questions

    path = resolve_data_path(data)
    qs = [q for sample in load_locomo(path) for q in select_questions(sample)]
    return path, qs if limit is None else qs[:limit]


def spread(n: int, k: int) -> list[int]:
    """`k` evenly spaced indices out of `n` (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    return [(i * n) // k for i in range(k)]


def load_peft_reference(ref, adapter: Path, device: torch.device):
    """transformers model + the adapter files through peft (eval, no grad)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(ref, str(adapter))
    model.to(device).eval().requires_grad_(False)
    return model


def check_locomo_inputs(args) -> tuple[Path, list]:
    """The LoCoMo questions and a look at --adapter, before any model is loaded: bad input stops with
    one line instead of after the other workloads have run."""
    from bench.locomo_data import LocomoDataError
    from lora_mem.lora_core.adapter_io import AdapterError, read_adapter_config

    try:
        data_path, questions = locomo_questions(args.data, args.locomo_questions)
        if args.adapter:
            read_adapter_config(Path(args.adapter))
    except (LocomoDataError, AdapterError) as e:
        raise SystemExit(f"error: {e}") from e
    if not questions:
        raise SystemExit(f"error: no LoCoMo questions of categories 1-4 in {data_path}")
    return data_path, questions


def answer_with_adapter(model, peft_ref, prompts: list[list[int]], B: int, n_new: int, stop: list[int], pad: int,
                        hf_bs1_questions: int, device: torch.device, log) -> tuple[dict, list, list]:
    """Questions answered with an adapter on both sides, timed once each: lora-mem generate(batch_size=B) (continuous
    batching), transformers+peft at batch 1 on an evenly spaced subset (`hf_bs1_questions`, 0: all; its rate
    extrapolated) and at batch B. Returns (the rows, ratios and goals; lora-mem's answers; transformers' batch-B
    answers)."""
    n = len(prompts)
    # transformers at batch B gets the order lora-mem takes prompts in (sorted by length, stable), in chunks of B.
    order = sorted(range(n), key=lambda i: len(prompts[i]))
    subset = spread(n, hf_bs1_questions or n)

    def ours():
        return generate(model, prompts, n_new, stop_ids=stop, pad_id=pad, batch_size=B)

    def hf1():
        return hf_generate(peft_ref, [prompts[i] for i in subset], n_new, stop, pad, 1, device)

    def hfb():
        outs = hf_generate(peft_ref, [prompts[i] for i in order], n_new, stop, pad, B, device)
        back: list = [None] * n
        for i, o in zip(order, outs):
            back[i] = o
        return back

    load_before = loadavg()
    warm = prompts[:B]
    generate(model, warm, min(4, n_new), stop_ids=stop, pad_id=pad, batch_size=B)  # warm-ups
    hf_generate(peft_ref, warm[:1], min(4, n_new), stop, pad, 1, device)
    hf_generate(peft_ref, warm, min(4, n_new), stop, pad, B, device)
    sides = {}
    for name, fn in (("lora_mem", ours), ("transformers_peft_batch1", hf1), ("transformers_peft_batched", hfb)):
        log(f"  {name} ...")
        ((t, out),) = timed([fn], 1, device)
        sides[name] = (t, out)
        log(f"  {name:<28}{t[0]:8.2f} s")
    (ours_t, ours_out), (hf1_t, hf1_out), (hfb_t, hfb_out) = (sides[k] for k in sides)

    def count(outs):
        return sum(len(o) for o in outs)

    k = len(subset)
    ours_sub = [ours_out[i] for i in subset]
    hf1_row = side_row(hf1_t, count(hf1_out), k)
    hf1_row.update({"measured_questions": k, "extrapolated": k < n,
                    "subset": "all questions" if k == n else f"{k} evenly spaced questions of {n} (index i*{n}//{k})",
                    "seconds_all_questions_extrapolated": round(hf1_row["seconds_median"] * n / k, 2)})
    row = {
        "batch_size": B,
        "prompt_tokens": {"min": min(map(len, prompts)), "max": max(map(len, prompts)),
                          "mean": round(sum(map(len, prompts)) / n, 1)},
        "max_new_tokens": n_new,
        "stop_ids": list(stop),
        "repeats": 1,
        "lora_mem_path": "lora_core load_adapter (unmerged LoRALinear) + generate(batch_size=B), continuous batching",
        "transformers_path": "peft PeftModel.from_pretrained(same adapter files); generate greedy; batch 1 on the "
                             "subset; batch B left-padded with an attention mask, in chunks of B of lora-mem's "
                             "length-sorted order",
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "lora_mem": side_row(ours_t, count(ours_out), n),
        "transformers_peft_batch1": hf1_row,
        "transformers_peft_batched": side_row(hfb_t, count(hfb_out), n),
        # Greedy answers should agree; padded batches may flip near-ties (different matmul shapes).
        "answers_identical_transformers_batch1": sum(a == b for a, b in zip(ours_sub, hf1_out)),
        "answers_compared_transformers_batch1": k,
        "answers_identical_transformers_batched": sum(a == b for a, b in zip(ours_out, hfb_out)),
        "answers_compared_transformers_batched": n,
    }
    q = row["lora_mem"]["questions_per_s"]
    row["ratio_vs_transformers_batch1"] = ratio(q, hf1_row["questions_per_s"])
    row["ratio_vs_transformers_batched"] = ratio(q, row["transformers_peft_batched"]["questions_per_s"])
    row["goals"] = dict(LOCOMO_GOALS)
    for peer, goal in LOCOMO_GOALS.items():
        row[f"meets_goal_{peer}"] = (row[f"ratio_{peer}"] or 0) >= goal
    return row, ours_out, hfb_out


def adapter_for(lm: LoadedModel, ref, args, tmp: str, device: torch.device) -> tuple[dict, object]:
    """--adapter DIR, or a seeded random one saved under `tmp`, loaded into lm.model (lora_core, unmerged) and
    into `ref` through peft. Returns (what the results file says about it, the peft model)."""
    from lora_mem.lora_core.adapter_io import load_adapter

    if args.adapter:
        adapter_dir, source = Path(args.adapter), "given"
    else:
        adapter_dir = random_adapter(lm, args.random_adapter_rank, Path(tmp) / "adapter",
                                     b_std=args.random_adapter_b_std)
        source = "random"
    cfg = load_adapter(lm.model, adapter_dir)  # unmerged LoRALinear layers, as bench.locomo answers
    peft_ref = load_peft_reference(ref, adapter_dir, device)
    info = {"source": source, "path": str(adapter_dir) if source == "given" else None,
            "rank": cfg.rank, "alpha": cfg.alpha, "use_rslora": cfg.use_rslora, "target_modules": cfg.target_modules,
            **({"seed": 0, "init": f"A ~ N(0, 1/in), B ~ N(0, {args.random_adapter_b_std:g}^2)"}
               if source == "random" else {})}
    return info, peft_ref


def add_profile(row: dict, model, prompts: list[list[int]], B: int, n_new: int, stop: list[int], pad: int,
                device: torch.device) -> None:
    """--profile: lora-mem's generate of the 4B shortest prompts (several batches' worth: rows are refilled)."""
    first = sorted(prompts, key=len)[:4 * B]
    row["profile"] = {"what": f"lora-mem generate of the {len(first)} shortest questions at batch {B}",
                      **profile_ops(lambda: generate(model, first, n_new, stop_ids=stop, pad_id=pad, batch_size=B),
                                    1, device, label="generate")}


def run_locomo(lm: LoadedModel, ref, args, device: torch.device, log,
               inputs: tuple[Path, list] | None = None) -> dict:
    """The LoCoMo answering workload with one adapter (see the module docstring). Leaves the adapter
    in `lm.model` (lora_core LoRA layers) and `ref` (peft layers): run it last."""
    from lora_mem.lora_core.memory import QUESTION_TEMPLATE

    tok, model = lm.tokenizer, lm.model
    data_path, questions = inputs or check_locomo_inputs(args)
    prompts = [tok.encode_chat([{"role": "user", "content": QUESTION_TEMPLATE.format(question=q.question)}])
               for q in questions]
    B, n_new, stop, pad = args.locomo_batch_size, args.locomo_max_new_tokens, tok.stop_ids, tok.pad_id
    n = len(prompts)
    limit = lm.config.max_position_embeddings
    if max(map(len, prompts)) + n_new > limit:
        raise SystemExit(f"error: a LoCoMo prompt of {max(map(len, prompts))} tokens + {n_new} new tokens exceeds "
                         f"the model's {limit} positions")
    with tempfile.TemporaryDirectory(prefix="decode-adapter-") as tmp:
        adapter, peft_ref = adapter_for(lm, ref, args, tmp, device)
    log(f"locomo: {n} questions from {data_path}, adapter {adapter['path'] or 'random'} "
        f"(r={adapter['rank']}, alpha={adapter['alpha']:g}), batch {B}, max_new_tokens {n_new}, stop at {stop}")
    sides, ours_out, hfb_out = answer_with_adapter(model, peft_ref, prompts, B, n_new, stop, pad,
                                                   args.hf_bs1_questions, device, log)
    row = {
        "workload": "locomo",
        "data": str(data_path),
        "questions": n,
        "categories": {str(c): sum(q.category == c for q in questions) for c in sorted({q.category for q in questions})},
        "question_template": QUESTION_TEMPLATE,
        "adapter": adapter,
        **sides,
        "sample_answers": [{"question": q.question, "answer": tok.decode(o).strip()}
                           for q, o in list(zip(questions, ours_out))[:3]],
    }
    differing = [i for i in range(n) if ours_out[i] != hfb_out[i]]
    row["differing_answers_batched"] = [
        {"question": questions[i].question, "lora_mem": tok.decode(ours_out[i]).strip(),
         "transformers_peft_batched": tok.decode(hfb_out[i]).strip()} for i in differing[:5]]
    if args.profile:
        add_profile(row, model, prompts, B, n_new, stop, pad, device)
    return row


def synthetic_prompts(n: int, lengths: tuple[int, int], vocab: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts of seeded random token ids, lengths lo, lo+1, ..., hi, lo, ... in turn."""
    lo, hi = lengths
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (lo + i % (hi - lo + 1),), generator=g).tolist() for i in range(n)]


def run_synthetic(lm: LoadedModel, ref, args, device: torch.device, log) -> dict:
    """The LoCoMo answering workload's shape without its text: for models with no tokenizer (the random presets,
    e.g. Qwen2.5-1.5B shapes on a GPU) or no data. `--synthetic-questions` prompts of random token ids, lengths
    spread over `--synthetic-prompt-tokens` (default 45-73: the LoCoMo chat prompts of the default model), every
    answer exactly `--synthetic-new-tokens` long (EOS disabled: random weights never choose to stop), an adapter
    on both sides as in the locomo workload. Every answer has the cap's length, where real ones stop early, so as a
    projection of LoCoMo answering its time is an upper bound, and lora-mem's refills gain nothing over
    transformers' fixed batches here."""
    vocab = lm.config.vocab_size
    prompts = synthetic_prompts(args.synthetic_questions, args.synthetic_prompt_tokens, vocab)
    B, n_new, stop, pad = args.batch_size, args.synthetic_new_tokens, [], 0
    if args.synthetic_prompt_tokens[1] + n_new > lm.config.max_position_embeddings:
        raise SystemExit(f"error: --synthetic-prompt-tokens up to {args.synthetic_prompt_tokens[1]} + "
                         f"{n_new} new tokens exceeds the model's {lm.config.max_position_embeddings} positions")
    with tempfile.TemporaryDirectory(prefix="decode-adapter-") as tmp:
        adapter, peft_ref = adapter_for(lm, ref, args, tmp, device)
    log(f"synthetic: {len(prompts)} prompts of {args.synthetic_prompt_tokens[0]}-{args.synthetic_prompt_tokens[1]} "
        f"random token ids, {n_new} new tokens each (EOS disabled), adapter {adapter['path'] or 'random'} "
        f"(r={adapter['rank']}), batch {B}")
    sides, ours_out, _ = answer_with_adapter(model=lm.model, peft_ref=peft_ref, prompts=prompts, B=B, n_new=n_new,
                                             stop=stop, pad=pad, hf_bs1_questions=args.hf_bs1_questions,
                                             device=device, log=log)
    row = {"workload": "synthetic", "questions": len(prompts),
           "prompts": f"seeded random token ids (seed 0) in [0, {vocab}), lengths "
                      f"{args.synthetic_prompt_tokens[0]}..{args.synthetic_prompt_tokens[1]} in turn",
           "eos": "disabled (stop_ids=[] / eos_token_id=None): every answer is max_new_tokens long",
           "adapter": adapter, **sides}
    if args.profile:
        add_profile(row, lm.model, prompts, B, n_new, stop, pad, device)
    return row


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = Parser(
        prog="python -m bench.perf.decode",
        description="Greedy decoding speed of lora-mem vs transformers generate (same model, dtype, machine).",
    )
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="packaged name, checkpoint dir or hub id; or preset:NAME, randomly initialised shapes of "
                         "lora_mem.model.config.PRESETS (e.g. preset:qwen2.5-1.5b; synthetic workload only)"),
    ap.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                    help="float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--workloads", default=None,
                    help=f"comma-separated, of {', '.join(WORKLOADS)}; 'all' is all three "
                         f"(default: {DEFAULT_WORKLOADS}; locomo needs the LoCoMo data)")
    ap.add_argument("--workload", choices=["all", "single", "batched"], default=None,
                    help="older spelling: all = single_stream,batched; single = single_stream")
    ap.add_argument("--max-new-tokens", type=positive_int, default=None, help="single-stream new tokens, EOS disabled (default 64; quick 16)")
    ap.add_argument("--single-prompts", type=positive_int, default=None,
                    help=f"single-stream prompts, at most {len(SINGLE_STREAM_QUESTIONS)} (default all; quick 1)")
    ap.add_argument("--repeats", type=positive_int, default=None, help="timed single-stream runs, median reported (default 3; quick 1)")
    ap.add_argument("--num-prompts", type=positive_int, default=None, help="batched: number of questions (default 64; quick 8)")
    ap.add_argument("--batch-size", type=positive_int, default=None, help="batched: lora-mem and transformers batch size (default 64; quick 8)")
    ap.add_argument("--batched-max-new-tokens", type=positive_int, default=None, help="batched: max new tokens per answer (default 32; quick 8)")
    ap.add_argument("--batched-repeats", type=positive_int, default=None, help="timed batched runs, median reported (default 1)")
    ap.add_argument("--data", default=None,
                    help="locomo: locomo10.json (default: $LOCOMO_DATA, the cache, or a download)")
    ap.add_argument("--adapter", default=None,
                    help="locomo: a LoRA adapter directory in PEFT format, e.g. runs/locomo-r8/adapters/conv-26 "
                         "(default: a seeded random adapter of --random-adapter-rank, saved to a temp dir)")
    ap.add_argument("--random-adapter-rank", type=positive_int, default=8, help="locomo: rank of the random adapter (default 8)")
    ap.add_argument("--random-adapter-b-std", type=float_in(0.0, low_open=False), default=0.02,
                    help="locomo: std of the random adapter's B (A ~ N(0, 1/in)); default 0.02, about the size of "
                         "trained adapters")
    ap.add_argument("--locomo-questions", type=positive_int, default=None,
                    help="locomo: the first N questions of categories 1-4 (default all: 1,540 in locomo10.json; quick 16)")
    ap.add_argument("--locomo-batch-size", type=positive_int, default=None,
                    help="locomo: batch size of lora-mem and of transformers' batched run (default 64, as "
                         "bench.locomo --answer-batch-size; quick 8)")
    ap.add_argument("--locomo-max-new-tokens", type=positive_int, default=None,
                    help="locomo: max new tokens per answer (default 32, as bench.locomo; quick 8)")
    ap.add_argument("--synthetic-questions", type=positive_int, default=1540,
                    help="synthetic: number of prompts (default 1540, LoCoMo's questions of categories 1-4)")
    ap.add_argument("--synthetic-prompt-tokens", default="45-73",
                    help="synthetic: prompt lengths LO-HI, in turn (default 45-73: the default model's LoCoMo prompts)")
    ap.add_argument("--synthetic-new-tokens", type=positive_int, default=32,
                    help="synthetic: new tokens per answer, EOS disabled (default 32, bench.locomo's cap)")
    ap.add_argument("--hf-bs1-questions", type=non_negative_int, default=None,
                    help="locomo: transformers at batch 1 answers this many evenly spaced questions and its rate is "
                         "extrapolated (default 256; 0 or a value >= the question count: all; quick: all)")
    ap.add_argument("--profile", action="store_true",
                    help="batched and locomo: profile one more lora-mem generate (4 batches' worth for locomo) with "
                         "torch.profiler; top ops and grouped shares go into the workload's 'profile'")
    ap.add_argument("--threads", type=positive_int, default=None,
                    help="torch.set_num_threads for both sides (default: leave torch's default; recorded either way). "
                         "On a shared CPU, fewer threads than cores avoids OpenMP stalls when a core is taken")
    ap.add_argument("--quick", action="store_true", help="fewer prompts and tokens: a fast smoke run")
    ap.add_argument("--out", default=None,
                    help="output JSON (default bench/results/decode_<device>[_<workloads>][_quick].json, the "
                         "workloads named unless they are the default ones)")
    args = ap.parse_args(argv)
    defaults = dict(max_new_tokens=64, single_prompts=len(SINGLE_STREAM_QUESTIONS), repeats=3, num_prompts=64,
                    batch_size=64, batched_max_new_tokens=32, batched_repeats=1, locomo_batch_size=64,
                    locomo_max_new_tokens=32, hf_bs1_questions=256)
    if args.quick:
        defaults.update(max_new_tokens=16, single_prompts=1, repeats=1, num_prompts=8, batch_size=8,
                        batched_max_new_tokens=8, locomo_questions=16, locomo_batch_size=8, locomo_max_new_tokens=8,
                        hf_bs1_questions=0)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.single_prompts = max(1, min(args.single_prompts, len(SINGLE_STREAM_QUESTIONS)))
    if args.workloads is not None and args.workload is not None:
        ap.error("give --workloads or --workload, not both")
    if args.workload is not None:
        args.workloads = {"all": DEFAULT_WORKLOADS, "single": "single_stream", "batched": "batched"}[args.workload]
    names = [w.strip() for w in (args.workloads or DEFAULT_WORKLOADS).split(",") if w.strip()]
    if names == ["all"]:  # every workload of a real checkpoint (synthetic is for models without a tokenizer)
        names = [w for w in WORKLOADS if w != "synthetic"]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown or not names:
        ap.error(f"--workloads: unknown {unknown} (choose from {', '.join(WORKLOADS)} or all)")
    args.workloads = [w for w in WORKLOADS if w in names]  # adapter workloads last: they leave it in both models
    if "synthetic" in args.workloads and "locomo" in args.workloads:
        ap.error("--workloads: synthetic and locomo each put an adapter into both models; run them separately")
    if args.model.startswith(PRESET_PREFIX):
        from lora_mem.model.config import PRESETS

        if args.model[len(PRESET_PREFIX):] not in PRESETS:
            ap.error(f"--model {args.model}: unknown preset (choose from {', '.join(PRESETS)})")
        if args.workloads != list(TOKENIZER_FREE_WORKLOADS):
            ap.error(f"--model {args.model} is random weights with no tokenizer: only --workloads synthetic runs on it")
    try:
        lo, hi = (int(x) for x in args.synthetic_prompt_tokens.split("-"))
    except ValueError:
        ap.error(f"--synthetic-prompt-tokens {args.synthetic_prompt_tokens!r}: expected LO-HI, e.g. 45-73")
    if not 1 <= lo <= hi:
        ap.error(f"--synthetic-prompt-tokens {args.synthetic_prompt_tokens!r}: need 1 <= LO <= HI")
    args.synthetic_prompt_tokens = (lo, hi)
    del args.workload
    return args


def print_locomo(w: dict) -> None:
    """The locomo and synthetic workloads (answering with an adapter)."""
    B, n = w["batch_size"], w["questions"]
    h1 = w["transformers_peft_batch1"]
    a = w["adapter"]
    length = f"<= {w['max_new_tokens']}" if w["workload"] == "locomo" else f"exactly {w['max_new_tokens']}"
    print(f"{w['workload']} ({n} q, {length} tok, adapter {a['source']} r={a['rank']})")
    rows = [(f"lora-mem bs {B}", w["lora_mem"], None, None),
            (f"transformers+peft bs 1{' *' if h1['extrapolated'] else ''}", h1, w["ratio_vs_transformers_batch1"],
             w["goals"]["vs_transformers_batch1"]),
            (f"transformers+peft bs {B}", w["transformers_peft_batched"], w["ratio_vs_transformers_batched"],
             w["goals"]["vs_transformers_batched"])]
    for name, s, r, goal in rows:
        rs = f"{r:>8.2f}x" if r is not None else f"{'':>9}"
        gs = f"  (goal >= {goal:g}x: {'met' if r is not None and r >= goal else 'not met'})" if goal else ""
        print(f"  {name:<32}{s['seconds_median']:>10.2f}{s['tokens_per_s']:>12.1f}{s['questions_per_s']:>13.2f}{rs}{gs}")
    if h1["extrapolated"]:
        print(f"  * measured on {h1['measured_questions']} of {n} questions, rate extrapolated "
              f"({h1['seconds_all_questions_extrapolated']:.0f} s for all)")
    print(f"  answers identical to lora-mem: transformers bs 1 {w['answers_identical_transformers_batch1']}/"
          f"{w['answers_compared_transformers_batch1']}, bs {B} {w['answers_identical_transformers_batched']}/"
          f"{w['answers_compared_transformers_batched']}")


def print_table(result: dict) -> None:
    print(f"\n{result['model']} on {result['device_name']} ({result['dtype']}, torch {result['versions']['torch']}, "
          f"transformers {result['versions']['transformers']}, {result['cpu']['torch_num_threads']} threads, "
          f"load {result['loadavg_start']} -> {result['loadavg_end']})")
    print(f"{'workload':<34}{'seconds':>10}{'tokens/s':>12}{'questions/s':>13}{'ratio':>9}")
    for w in result["workloads"]:
        if w["workload"] in ("locomo", "synthetic"):
            print_locomo(w)
            continue
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
    for w in result["workloads"]:
        if "profile" in w:
            print(f"profile of {w['workload']} ({w['profile']['what']}), self time by group:\n{format_profile(w['profile'])}")


def default_out_name(slug: str, workloads: list[str], quick: bool) -> str:
    """decode_<device>.json for the default workloads; other selections get their names in the file
    name (decode_cpu_locomo.json), so a run of one workload never overwrites the default results."""
    tag = "" if workloads == DEFAULT_WORKLOADS.split(",") else "_" + "_".join(workloads)
    return f"decode_{slug}{tag}{'_quick' if quick else ''}.json"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    default_threads = torch.get_num_threads()
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    command = " ".join(["python -m bench.perf.decode"] + (sys.argv[1:] if argv is None else list(argv)))
    load_start = loadavg()
    started = datetime.now(timezone.utc)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    locomo_inputs = check_locomo_inputs(args) if "locomo" in args.workloads else None
    if args.model.startswith(PRESET_PREFIX):
        lm, ref = load_random_preset(args.model[len(PRESET_PREFIX):], args.device, args.dtype)
    else:
        lm = load_model(args.model, device=args.device, dtype=args.dtype)
        ref = load_reference(lm.path, lm.model.lm_head.weight.device, lm.model.lm_head.weight.dtype)
    device = lm.model.lm_head.weight.device
    dtype = lm.model.lm_head.weight.dtype
    log(f"loaded {args.model} ({lm.path or 'random weights'}) on {device} in {str(dtype).removeprefix('torch.')}")

    run = {"single_stream": run_single_stream, "batched": run_batched, "synthetic": run_synthetic,
           "locomo": lambda *a: run_locomo(*a, inputs=locomo_inputs)}
    workloads = [run[w](lm, ref, args, device, log) for w in args.workloads]

    slug = device_slug(device)
    result = {
        "benchmark": "decode",
        "created_utc": started.isoformat(timespec="seconds"),
        "duration_s": round((datetime.now(timezone.utc) - started).total_seconds(), 1),
        "command": command,
        "quick": args.quick,
        "model": args.model,
        "checkpoint": str(lm.path) if lm.path else "none: random weights (seed 0), the same on both sides",
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
        # how lora-mem's generate schedules rows (lora_mem.model.generate): continuous batching
        "lora_mem_batching": {"refill_fraction": gen.REFILL_FRACTION, "trim_columns": gen.TRIM_COLUMNS},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "workloads": workloads,
    }
    out = Path(args.out) if args.out else RESULTS_DIR / default_out_name(slug, args.workloads, args.quick)
    atomic_write_json(out, result)
    print_table(result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
