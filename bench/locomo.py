"""The LoRA-Mem experiment on LoCoMo, end to end: one adapter per conversation, questions answered
with no context, scored as LoCoMo scores them; and the context baselines it is placed against.

    python -m bench.locomo --rank 8                 # LoRA-Mem, r=8 (the experiment's main row)
    python -m bench.locomo --method base            # the base model, no adapter, no context
    python -m bench.locomo --method icl             # the latest sessions that fit the context window
    python -m bench.locomo --method rag --top-k 10  # BM25 top-10 turns per question, with their dates
    python -m bench.locomo --method lora+rag --adapters-from runs/locomo-r8   # reuse a run's adapters
    python -m bench.locomo --rank 8 --shared-batches                          # all adapters in one batch

Each conversation's outputs land under `--out` as they finish (atomically); a rerun with the same
`--out` skips finished conversations, so an interrupted run loses at most the one in progress.

    <out>/run_config.json                      settings of the run (a resume must match them)
    <out>/conversations/<sample_id>/           predictions.jsonl, train.json (loss curve), result.json
    <out>/adapters/<sample_id>/                the adapter, in PEFT format
    <out>/results.json, predictions.jsonl, table.md     the whole run, written at the end
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import atomic_write_json, atomic_write_text, read_jsonl, run_info, write_jsonl
from bench.context import CONTEXT_TEMPLATE, RAG_TEMPLATE, RAG_UNITS, BM25Retriever, context_prompt, icl_context
from bench.generated_qa import generate_qa
from bench.internalize import ABSTENTION_STYLES, QA_SOURCES, TRAIN_FORMATS, training_data
from bench.locomo_data import CATEGORY_NAMES, Sample, iter_samples, load_locomo, resolve_data_path, select_questions
from bench.locomo_score import aggregate, format_table, score_qa
from lora_mem.lora_core.adapter_io import AdapterError, load_adapter, save_adapter
from lora_mem.lora_core.inject import LoRAConfig, inject_lora, reset_lora, trainable_summary
from lora_mem.lora_core.multi_adapter import stack_adapters, unstack_adapters
from lora_mem.lora_core.train import IGNORE_INDEX, TrainConfig, train_lora
from lora_mem.model.generate import generate
from lora_mem.model.loader import LoadedModel, load_model

# The instruction that turns a LoCoMo question into a chat turn. Kept in one place and recorded.
QUESTION_TEMPLATE = "Answer the question in a few words.\nQuestion: {question}"

# Settings that change results: a resumed run must agree on all of them.
RESULT_SETTINGS = (
    "method", "model", "dtype", "rank", "alpha", "dropout", "use_rslora", "epochs", "lr", "batch_size",
    "grad_accum", "warmup_ratio", "seq_len", "seed", "max_new_tokens", "max_questions", "with_adversarial",
    "timestamps", "train_format", "context_tokens", "top_k", "rag_unit", "adapters_from",
    "resolve_dates", "qa_per_turn", "train_abstention", "abstention_ratio", "qa_source", "abstention_style",
)
# Settings newer than the first runs, with the value an older run_config.json implies.
SETTINGS_ADDED_LATER = {"train_format": "text", "context_tokens": None, "top_k": None, "rag_unit": None,
                        "adapters_from": None, "resolve_dates": False, "qa_per_turn": None,
                        "train_abstention": False, "abstention_ratio": None, "qa_source": "templates",
                        "abstention_style": "unmentioned"}
METHODS = ("lora", "base", "icl", "rag", "lora+rag")
TRAINING_SETTINGS = ("rank", "alpha", "dropout", "use_rslora", "epochs", "lr", "batch_size", "grad_accum",
                     "warmup_ratio", "seq_len", "timestamps", "train_format", "resolve_dates", "qa_per_turn",
                     "train_abstention", "abstention_ratio", "qa_source", "abstention_style")
QA_SOURCE_LABELS = {"model": "the base model", "both": "templates + base model"}
# Room left in the context window for the chat markup, the question and the answer (ICL).
ICL_RESERVE_TOKENS = 256


def uses_adapter(method: str) -> bool:
    return method in ("lora", "lora+rag")


def uses_rag(method: str) -> bool:
    return method in ("rag", "lora+rag")


class RunConfigMismatch(ValueError):
    pass


def method_label(args) -> str:
    label = _method_label(args)
    return label + " [+cat 5]" if args.with_adversarial else label  # also asked the adversarial questions


def _method_label(args) -> str:
    rag = f"RAG (BM25 top-{args.top_k} {args.rag_unit}s)" if uses_rag(args.method) else ""
    if args.method == "base":
        return "Base (no context)"
    if args.method == "icl":
        return f"ICL (latest {args.context_tokens} tokens)"
    if args.method == "rag":
        return rag
    extras = "".join([", timestamps" if args.timestamps and not args.resolve_dates else "",
                      ", timestamps+dates" if args.resolve_dates else "",
                      f", {args.train_format}" if args.train_format != "text" else "",
                      f" ({args.qa_per_turn}/turn)" if args.qa_per_turn and args.train_format != "text" else "",
                      f" by {QA_SOURCE_LABELS[args.qa_source]}" if args.qa_source != "templates" else "",
                      f", {'contrastive ' if args.abstention_style == 'contrastive' else ''}abstention "
                      f"{args.abstention_ratio:g}" if args.train_abstention else "",
                      # text format: the template pool that sets how many abstention pairs there are
                      f" ({args.qa_per_turn}/turn)" if args.qa_per_turn and args.train_format == "text"
                      and args.train_abstention else ""])
    lora = f"LoRA-Mem (r={args.rank}{extras})"
    return f"{lora} + {rag}" if args.method == "lora+rag" else lora


# ---------------------------------------------------------------------------------------------
# Training data and answering
# ---------------------------------------------------------------------------------------------

def training_windows(sample: Sample, lm: LoadedModel, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Training windows of one conversation (bench.internalize): built from the conversation alone,
    never from QA annotations, observations or summaries. `--qa-source model|both`: the base model writes
    questions about the turns first (bench.generated_qa, cached)."""
    generated = None
    if args.qa_source != "templates" and (args.train_format != "text" or args.train_abstention):
        generated = generate_qa(sample, lm, progress=not args.quiet).pairs
    return training_data(sample, lm.tokenizer, args.train_format, args.seq_len, args.timestamps, QUESTION_TEMPLATE,
                         resolve_dates=args.resolve_dates, qa_per_turn=args.qa_per_turn,
                         abstention=args.train_abstention, abstention_ratio=args.abstention_ratio, seed=args.seed,
                         qa_source=args.qa_source, generated=generated, abstention_style=args.abstention_style)


def question_prompts(sample: Sample, questions: list, lm: LoadedModel, args) -> tuple[list[list[int]], dict]:
    """The chat prompt of each question for the method (token ids), and what context went in.

    Every method asks the same instruction; icl and rag put the conversation (or retrieved turns)
    ahead of it in the same user turn."""
    tok = lm.tokenizer
    asks = [QUESTION_TEMPLATE.format(question=q.question) for q in questions]
    info: dict = {}
    if args.method == "icl":
        ctx = icl_context(sample, tok, args.context_tokens)
        users = [context_prompt(CONTEXT_TEMPLATE, sample, ctx.text, a) for a in asks]
        info = {"context_tokens": ctx.tokens, "sessions_kept": ctx.sessions_kept, "sessions_total": ctx.sessions_total,
                "turns_kept": ctx.turns_kept, "turns_total": ctx.turns_total}
    elif uses_rag(args.method):
        retriever = BM25Retriever(sample, args.rag_unit)
        hits = retriever.retrieve([q.question for q in questions], args.top_k)
        users = [context_prompt(RAG_TEMPLATE, sample, retriever.context(h), a) for h, a in zip(hits, asks)]
        info = {"retrieved": hits, "documents": len(retriever.docs)}
    else:
        users = asks
    prompts = [tok.encode_chat([{"role": "user", "content": u}]) for u in users]
    limit = lm.config.max_position_embeddings
    longest = max((len(p) for p in prompts), default=0)
    if longest + args.max_new_tokens > limit:
        raise ContextTooLong(f"{sample.sample_id}: a prompt of {longest} tokens + {args.max_new_tokens} new tokens "
                             f"exceeds the model's context of {limit} positions (lower --top-k or --context-tokens)")
    return prompts, info


class ContextTooLong(ValueError):
    pass


def answer_prompts(lm: LoadedModel, prompts: list[list[int]], args,
                   adapter_ids: list[int] | None = None) -> tuple[list[str], float]:
    tok = lm.tokenizer
    t0 = time.perf_counter()
    outs = generate(lm.model, prompts, args.max_new_tokens, tok.stop_ids, tok.pad_id,
                    batch_size=args.answer_batch_size, progress=not args.quiet, adapter_ids=adapter_ids)
    return [tok.decode(o).strip() for o in outs], time.perf_counter() - t0


def gold_answer(qa) -> str:
    return qa.answer if qa.category != 5 else (qa.adversarial_answer or qa.answer or "")


# ---------------------------------------------------------------------------------------------
# One conversation
# ---------------------------------------------------------------------------------------------

def adapter_dir(out: Path, args, sample_id: str) -> Path:
    return (Path(args.adapters_from) if args.adapters_from else out) / "adapters" / sample_id


def prepare_adapter(sample: Sample, lm: LoadedModel, lora_cfg: LoRAConfig, args, out: Path) -> dict:
    """Put this conversation's adapter into the model: trained here (and saved), taken from an earlier
    invocation of this run (resume), or from another run (--adapters-from). Returns result fields."""
    conv_dir = out / "conversations" / sample.sample_id
    path = adapter_dir(out, args, sample.sample_id)
    if args.adapters_from:
        load_adapter(lm.model, path)
        return {"adapter": str(path)}
    if (conv_dir / "train.json").is_file() and path.is_dir():  # trained by an earlier invocation
        load_adapter(lm.model, path)
        train = json.loads((conv_dir / "train.json").read_text())
    else:
        reset_lora(lm.model, torch.Generator().manual_seed(args.seed))  # a fresh adapter, same init every time
        ids, labels = training_windows(sample, lm, args)
        result = train_lora(lm.model, ids, labels, train_config(args), progress=not args.quiet,
                            desc=f"train {sample.sample_id}")
        train = {"sample_id": sample.sample_id, "windows": ids.shape[0], "seq_len": args.seq_len,
                 "target_tokens": int((labels != IGNORE_INDEX).sum()), **result.to_dict()}
        if not result.error:
            save_adapter(lm.model, path, lora_cfg, base_model=lm.name)
        atomic_write_json(conv_dir / "train.json", train)  # after the adapter: marks it complete
        # Answers go through the unmerged LoRA path: merge/unmerge round trips drift the base weights
        # by rounding (visibly in bf16), and every conversation must start from the exact base model.
    fields = {"train_tokens": train["tokens"], "train_seconds": train["seconds"],
              "final_loss": train["losses"][-1] if train["losses"] else None, "epochs_loss": train["epochs_loss"]}
    if train.get("error"):
        fields["error"] = f"training stopped: {train['error']}"
    return fields


def finish_conversation(sample: Sample, questions: list, answers: list[str], prompts: list[list[int]],
                        context: dict, result: dict, seconds: float, out: Path) -> dict:
    """Score and write one conversation's predictions; result.json last, as the 'finished' mark."""
    conv_dir = out / "conversations" / sample.sample_id
    retrieved = context.pop("retrieved", None)
    rows = []
    for i, (qa, pred) in enumerate(zip(questions, answers)):
        gold = gold_answer(qa)
        row = {"sample_id": sample.sample_id, "question": qa.question, "answer": gold,
               "category": qa.category, "prediction": pred, "f1": score_qa(pred, gold, qa.category),
               "prompt_tokens": len(prompts[i])}
        if retrieved is not None:
            row["retrieved"] = retrieved[i]
        rows.append(row)
    write_jsonl(conv_dir / "predictions.jsonl", rows)
    result.update(answer_seconds=seconds, f1=aggregate(rows), context=context or None,
                  prompt_tokens_mean=sum(len(p) for p in prompts) / max(len(prompts), 1))
    atomic_write_json(conv_dir / "result.json", result)
    return result


def run_conversation(sample: Sample, lm: LoadedModel, lora_cfg: LoRAConfig | None, args, out: Path) -> dict:
    questions = select_questions(sample, args.with_adversarial, args.max_questions)
    result: dict = {"sample_id": sample.sample_id, "n_questions": len(questions), "error": None}
    if lora_cfg is not None:
        result.update(prepare_adapter(sample, lm, lora_cfg, args, out))
        if result["error"]:
            atomic_write_json(out / "conversations" / sample.sample_id / "result.json", result)
            return result
    prompts, context = question_prompts(sample, questions, lm, args)
    answers, seconds = answer_prompts(lm, prompts, args)
    return finish_conversation(sample, questions, answers, prompts, context, result, seconds, out)


def run_shared_batches(samples: list[Sample], lm: LoadedModel, lora_cfg: LoRAConfig, args, out: Path) -> list[dict]:
    """Every conversation's adapter first, then all their questions in shared batches, each question
    answered by its own conversation's adapter (stacked; lora_mem/kernels/multi_lora_linear.py)."""
    results, ready = [], []
    for s in samples:
        questions = select_questions(s, args.with_adversarial, args.max_questions)
        result = {"sample_id": s.sample_id, "n_questions": len(questions), "error": None,
                  **prepare_adapter(s, lm, lora_cfg, args, out)}
        if result["error"]:
            atomic_write_json(out / "conversations" / s.sample_id / "result.json", result)
            results.append(result)
        else:
            ready.append((s, questions, result))
    if not ready:
        return results
    stack_adapters(lm.model, [adapter_dir(out, args, s.sample_id) for s, _, _ in ready])
    try:
        prompts, owners, contexts = [], [], []
        for i, (s, questions, _) in enumerate(ready):
            p, ctx = question_prompts(s, questions, lm, args)
            prompts += p
            owners += [i] * len(p)
            contexts.append(ctx)
        answers, seconds = answer_prompts(lm, prompts, args, adapter_ids=owners)
    finally:
        unstack_adapters(lm.model)
    start = 0
    for (s, questions, result), ctx in zip(ready, contexts):
        n = len(questions)
        result["answered_in_shared_batches"] = True  # answer_seconds: this conversation's share of the time
        results.append(finish_conversation(s, questions, answers[start:start + n], prompts[start:start + n], ctx,
                                           result, seconds * n / max(len(prompts), 1), out))
        start += n
    return results


def train_config(args) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       warmup_ratio=args.warmup_ratio, seed=args.seed,
                       gradient_checkpointing=args.grad_checkpointing)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def check_or_write_run_config(out: Path, settings: dict) -> None:
    path = out / "run_config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        # A setting added after that run was made was off there: it matches "off" or "not applicable".
        def agrees(k):
            if k not in old and k in SETTINGS_ADDED_LATER:
                return settings.get(k) in (None, SETTINGS_ADDED_LATER[k])
            return old.get(k) == settings.get(k)

        diffs = [f"{k}: saved {old.get(k)!r} vs now {settings.get(k)!r}" for k in RESULT_SETTINGS if not agrees(k)]
        if diffs:
            raise RunConfigMismatch(f"{out} holds a run with other settings ({'; '.join(diffs)}): "
                                    "use another --out, or the same settings to resume")
    else:
        atomic_write_json(path, settings)


def finished(out: Path, sample_id: str) -> bool:
    return (out / "conversations" / sample_id / "result.json").is_file()


def collect(out: Path, samples: list[Sample]) -> tuple[list[dict], list[dict]]:
    results, rows = [], []
    for s in samples:
        conv_dir = out / "conversations" / s.sample_id
        results.append(json.loads((conv_dir / "result.json").read_text()))
        if (conv_dir / "predictions.jsonl").is_file():
            rows += read_jsonl(conv_dir / "predictions.jsonl")
    return results, rows


def summarise(out: Path, samples: list[Sample], lm: LoadedModel, args, settings: dict, wall: float,
              info: dict) -> dict:
    conv_results, rows = collect(out, samples)
    write_jsonl(out / "predictions.jsonl", rows)
    scores = aggregate(rows)
    train_tokens = sum(r.get("train_tokens", 0) for r in conv_results)
    train_seconds = sum(r.get("train_seconds", 0.0) for r in conv_results)
    answer_seconds = sum(r.get("answer_seconds", 0.0) for r in conv_results)
    label = method_label(args)
    # A resumed run took the time of every invocation; a no-op resume (all finished) adds ~nothing.
    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    wall_total = previous.get("wall_seconds_all_invocations", previous.get("wall_seconds_this_invocation", 0.0)) + wall
    results = {
        "method": label,
        "settings": settings,
        "question_template": QUESTION_TEMPLATE,
        "model": {"name": lm.name, "path": str(lm.path), "config": lm.config.to_dict()},
        **info,
        "scores": scores,
        "categories": {str(k): v for k, v in CATEGORY_NAMES.items()},
        "n_conversations": len(samples),
        "errors": {r["sample_id"]: r["error"] for r in conv_results if r.get("error")},
        "wall_seconds_this_invocation": wall,
        "wall_seconds_all_invocations": wall_total,
        "train_tokens": train_tokens,
        "train_seconds": train_seconds,
        "train_tokens_per_second": train_tokens / train_seconds if train_seconds else None,
        "answer_seconds": answer_seconds,
        "answer_questions_per_second": len(rows) / answer_seconds if answer_seconds else None,
        "prompt_tokens_mean": sum(r["prompt_tokens"] for r in rows) / len(rows) if rows else None,
        "prompt_tokens_max": max((r["prompt_tokens"] for r in rows), default=None),
        "compute_seconds": train_seconds + answer_seconds,
        "conversations": conv_results,
    }
    results = json.loads(json.dumps(results, default=str))  # what the file holds (str keys)
    atomic_write_json(out / "results.json", results)
    table = format_table([(label, scores)])
    atomic_write_text(out / "table.md", table + "\n")
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.locomo",
        description="LoRA-Mem on LoCoMo: one LoRA adapter per conversation, questions answered without context.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--method", choices=METHODS, default="lora",
                    help="lora: train an adapter per conversation, ask without context; base: the model alone; "
                         "icl: the latest sessions that fit the context window; rag: BM25-retrieved turns; "
                         "lora+rag: both adapter and retrieval")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="packaged name, local checkpoint dir or hub id")
    ap.add_argument("--data", default=None, help="locomo10.json (else $LOCOMO_DATA, the cache, or a download)")
    ap.add_argument("--out", default=None, help="run directory (default runs/<time>); reuse it to resume")
    ap.add_argument("--conversations", default=None, help="comma-separated sample ids, e.g. conv-26,conv-30")
    ap.add_argument("--max-questions", type=int, default=None, help="first N questions of each conversation")
    ap.add_argument("--with-adversarial", action="store_true", help="also ask category 5 (adversarial) questions")
    ap.add_argument("--timestamps", action="store_true",
                    help="session dates in the training text (the experiment had none)")
    g = ap.add_argument_group("context baselines (icl, rag, lora+rag)")
    g.add_argument("--context-tokens", type=int, default=None,
                   help=f"icl: tokens of conversation in the prompt (default: the model's context window "
                        f"- {ICL_RESERVE_TOKENS})")
    g.add_argument("--top-k", type=int, default=10, help="rag: turns (or sessions) retrieved per question")
    g.add_argument("--rag-unit", choices=RAG_UNITS, default="turn", help="rag: what is retrieved")
    g = ap.add_argument_group("LoRA and training")
    g.add_argument("--adapters-from", default=None, metavar="RUN_DIR",
                   help="use the adapters a finished lora run saved (RUN_DIR/adapters/<sample_id>) instead of "
                        "training; its training settings are taken over")
    g.add_argument("--shared-batches", action="store_true",
                   help="answer all conversations' questions in shared batches, each with its own adapter "
                        "(multi-adapter LoRA); predictions equal one adapter at a time")
    g.add_argument("--train-format", choices=TRAIN_FORMATS, default="text",
                   help="text: next-token loss on the conversation (the experiment); qa: template questions about "
                        "the turns (who said what, when) in the chat format, loss on answers; text+qa: both")
    g.add_argument("--resolve-dates", action="store_true",
                   help="timestamps, and relative dates in turns resolved from the session date "
                        "('yesterday (7 May 2023)')")
    g.add_argument("--qa-per-turn", type=int, default=None,
                   help="qa formats: template questions per turn (default: all, about 3); 1 cuts qa data ~3x")
    g.add_argument("--qa-source", choices=QA_SOURCES, default="templates",
                   help="qa formats: who writes the questions: templates over the turns, the base model (one "
                        "question per turn, kept only if its answer is in the turn; bench.generated_qa), or both")
    g.add_argument("--train-abstention", action="store_true",
                   help="also train 'Not mentioned in the conversation.' for questions about subjects the "
                        "conversation never mentions (generated from the conversation alone)")
    g.add_argument("--abstention-ratio", type=float, default=0.1,
                   help="abstention questions per template question")
    g.add_argument("--abstention-style", choices=ABSTENTION_STYLES, default="unmentioned",
                   help="unmentioned: questions about subjects the conversation never mentions, beside template "
                        "questions; contrastive: each question form asked of the speaker who said a subject "
                        "(answered from the turn) and of the other one, who never did (not mentioned), as "
                        "LoCoMo's adversarial questions swap speakers")
    g.add_argument("--rank", type=int, default=8)
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout on the LoRA branch")
    g.add_argument("--use-rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    g.add_argument("--epochs", type=int, default=2)
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW)")
    g.add_argument("--batch-size", type=int, default=2, help="windows per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--warmup-ratio", type=float, default=0.1)
    g.add_argument("--seq-len", type=int, default=512, help="tokens per training window")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute decoder layers in backward: less memory, ~1/3 more compute")
    g = ap.add_argument_group("answering and runtime")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--answer-batch-size", type=int, default=64)
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default fp32 on CPU, bf16 on CUDA)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.alpha is None:
        args.alpha = 2.0 * args.rank
    if args.qa_per_turn is not None and args.qa_per_turn < 1:
        ap.error(f"--qa-per-turn must be at least 1, got {args.qa_per_turn}")
    if args.qa_source != "templates" and args.train_format == "text" and not args.train_abstention:
        ap.error(f"--qa-source {args.qa_source} applies to --train-format qa or text+qa (or --train-abstention)")
    if not 0 < args.abstention_ratio <= 1:
        ap.error(f"--abstention-ratio must be in (0, 1], got {args.abstention_ratio}")
    if args.top_k < 1:
        ap.error(f"--top-k must be at least 1, got {args.top_k}")
    if args.context_tokens is not None and args.context_tokens < 1:
        ap.error(f"--context-tokens must be at least 1, got {args.context_tokens}")
    if (args.adapters_from or args.shared_batches) and not uses_adapter(args.method):
        ap.error(f"--adapters-from and --shared-batches need an adapter method (lora, lora+rag), not {args.method}")
    return args


def take_over_training_settings(args) -> None:
    """--adapters-from: the adapters were trained with the source run's settings; record those."""
    path = Path(args.adapters_from) / "run_config.json"
    if not path.is_file():
        raise RunConfigMismatch(f"--adapters-from {args.adapters_from}: no run_config.json (not a bench.locomo run)")
    source = json.loads(path.read_text())
    if not uses_adapter(source.get("method", "")):
        raise RunConfigMismatch(f"--adapters-from {args.adapters_from}: a {source.get('method')!r} run has no adapters")
    if source.get("model") != args.model:
        raise RunConfigMismatch(f"--adapters-from {args.adapters_from}: adapters of model {source.get('model')!r}, "
                                f"this run uses {args.model!r}")
    for k in TRAINING_SETTINGS + ("seed",):
        # a setting added after the source run was made was off there
        setattr(args, k, source[k] if k in source else SETTINGS_ADDED_LATER.get(k))


# ---------------------------------------------------------------------------------------------
# Scale-out: under torchrun each rank takes every world_size-th conversation; rank 0 gathers.
# Conversations are independent (each adapter starts from the same seeded init), so the files
# are identical to a single-process run.
# ---------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def init_distributed(args) -> Dist:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
    else:
        args.device = "cpu"
        # CPU ranks share the machine's cores instead of each taking all of them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    # A rank may wait at the final barrier while another trains for a long time.
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=24))
    return Dist(rank, world_size)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    dist = init_distributed(args)
    try:
        return run(args, dist, t_start)
    finally:
        if dist.world_size > 1:
            torch.distributed.destroy_process_group()


def run(args, dist: Dist, t_start: float) -> dict | None:
    data_path = resolve_data_path(args.data)
    samples = load_locomo(data_path)
    if args.conversations:
        samples = iter_samples(samples, args.conversations)
    if args.out is None and dist.world_size > 1:
        raise RunConfigMismatch("--out is required under torchrun (all ranks must write one run directory)")
    out = Path(args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    if args.adapters_from:
        take_over_training_settings(args)
        args.adapters_from = str(Path(args.adapters_from))
        missing = [s.sample_id for s in samples if not adapter_dir(out, args, s.sample_id).is_dir()]
        if missing:
            raise RunConfigMismatch(f"--adapters-from {args.adapters_from}: no adapter for {', '.join(missing)}")

    lm = load_model(args.model, device=args.device, dtype=args.dtype, progress=not args.quiet)
    if args.method == "icl" and args.context_tokens is None:
        args.context_tokens = lm.config.max_position_embeddings - ICL_RESERVE_TOKENS
    settings = {k: getattr(args, k) for k in RESULT_SETTINGS} | {
        "answer_batch_size": args.answer_batch_size, "data": str(data_path),
        "conversations": [s.sample_id for s in samples], "shared_batches": args.shared_batches,
    }
    not_applicable = ()
    if not uses_adapter(args.method):  # these do not apply; keep them out of the resume check
        not_applicable += TRAINING_SETTINGS + ("adapters_from",)
    if args.method != "icl":
        not_applicable += ("context_tokens",)
    if not uses_rag(args.method):
        not_applicable += ("top_k", "rag_unit")
    if not args.train_abstention:
        not_applicable += ("abstention_ratio", "abstention_style")
    for k in not_applicable:
        settings[k] = None
    if dist.rank == 0:
        check_or_write_run_config(out, settings)
    dist.barrier()
    if dist.rank != 0:
        check_or_write_run_config(out, settings)

    lora_cfg = None
    if uses_adapter(args.method):
        lora_cfg = LoRAConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, use_rslora=args.use_rslora)
        inject_lora(lm.model, lora_cfg)
        if dist.rank == 0:
            print(trainable_summary(lm.model), file=sys.stderr)
    info = run_info(lm.model.lm_head.weight.device)
    info["dtype"] = str(lm.model.lm_head.weight.dtype).replace("torch.", "")

    todo = [s for s in samples[dist.rank::dist.world_size] if not finished(out, s.sample_id)]
    if len(todo) < len(samples) and dist.world_size == 1:
        print(f"resuming {out}: {len(samples) - len(todo)} of {len(samples)} conversations already finished",
              file=sys.stderr)
    if args.shared_batches:
        done = run_shared_batches(todo, lm, lora_cfg, args, out)
    else:
        done = (run_conversation(s, lm, lora_cfg, args, out) for s in todo)
    for r in done:
        status = f"error: {r['error']}" if r["error"] else f"avg F1 {r['f1']['avg_f1'] or 0:.2f}"
        print(f"[{r['sample_id']}] {r['n_questions']} questions, {status}", file=sys.stderr)

    dist.barrier()
    if dist.rank != 0:
        return None
    info["world_size"] = dist.world_size
    results = summarise(out, samples, lm, args, settings, time.perf_counter() - t_start, info)
    print(format_table([(results["method"], results["scores"])]))
    print(f"\nresults: {out / 'results.json'}  (wall {results['wall_seconds_this_invocation']:.0f}s)")
    return results


def cli() -> None:
    """main() with the project's input errors as one clear line, not a traceback."""
    from bench.locomo_data import LocomoDataError
    from lora_mem.model.config import ConfigError
    from lora_mem.model.loader import CheckpointError
    from lora_mem.model.packaged import PackagedModelError

    try:
        main()
    except (LocomoDataError, ConfigError, CheckpointError, PackagedModelError, AdapterError, RunConfigMismatch,
            ContextTooLong) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
