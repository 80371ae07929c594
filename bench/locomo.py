"""The LoRA-Mem experiment on LoCoMo, end to end: one adapter per conversation, questions answered
with no context, scored as LoCoMo scores them.

    python -m bench.locomo --rank 8                 # LoRA-Mem, r=8 (the experiment's main row)
    python -m bench.locomo --method base            # the base model, no adapter, no context

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
from bench.internalize import TRAIN_FORMATS, training_data
from bench.locomo_data import CATEGORY_NAMES, Sample, iter_samples, load_locomo, resolve_data_path, select_questions
from bench.locomo_score import aggregate, format_table, score_qa
from lora_core.adapter_io import save_adapter
from lora_core.inject import LoRAConfig, inject_lora, reset_lora, trainable_summary
from lora_core.train import IGNORE_INDEX, TrainConfig, train_lora
from model.generate import generate
from model.loader import LoadedModel, load_model

# The instruction that turns a LoCoMo question into a chat turn. Kept in one place and recorded.
QUESTION_TEMPLATE = "Answer the question in a few words.\nQuestion: {question}"

# Settings that change results: a resumed run must agree on all of them.
RESULT_SETTINGS = (
    "method", "model", "dtype", "rank", "alpha", "dropout", "use_rslora", "epochs", "lr", "batch_size",
    "grad_accum", "warmup_ratio", "seq_len", "seed", "max_new_tokens", "max_questions", "with_adversarial",
    "timestamps", "train_format",
)


class RunConfigMismatch(ValueError):
    pass


def method_label(args) -> str:
    if args.method == "base":
        return "Base (no context)"
    extras = "".join([", timestamps" if args.timestamps else "",
                      f", {args.train_format}" if args.train_format != "text" else ""])
    return f"LoRA-Mem (r={args.rank}{extras})"


# ---------------------------------------------------------------------------------------------
# Training data and answering
# ---------------------------------------------------------------------------------------------

def training_windows(sample: Sample, lm: LoadedModel, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Training windows of one conversation (bench.internalize): built from the conversation alone,
    never from QA annotations, observations or summaries."""
    return training_data(sample, lm.tokenizer, args.train_format, args.seq_len, args.timestamps, QUESTION_TEMPLATE)


def answer_questions(lm: LoadedModel, questions: list, args) -> tuple[list[str], float]:
    tok = lm.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": QUESTION_TEMPLATE.format(question=q.question)}])
               for q in questions]
    t0 = time.perf_counter()
    outs = generate(lm.model, prompts, args.max_new_tokens, tok.stop_ids, tok.pad_id,
                    batch_size=args.answer_batch_size, progress=not args.quiet)
    return [tok.decode(o).strip() for o in outs], time.perf_counter() - t0


def gold_answer(qa) -> str:
    return qa.answer if qa.category != 5 else (qa.adversarial_answer or qa.answer or "")


# ---------------------------------------------------------------------------------------------
# One conversation
# ---------------------------------------------------------------------------------------------

def run_conversation(sample: Sample, lm: LoadedModel, lora_cfg: LoRAConfig | None, args, out: Path) -> dict:
    conv_dir = out / "conversations" / sample.sample_id
    questions = select_questions(sample, args.with_adversarial, args.max_questions)
    result: dict = {"sample_id": sample.sample_id, "n_questions": len(questions), "error": None}
    if lora_cfg is not None:
        reset_lora(lm.model, torch.Generator().manual_seed(args.seed))  # a fresh adapter, same init every time
        ids, labels = training_windows(sample, lm, args)
        tcfg = train_config(args)
        train = train_lora(lm.model, ids, labels, tcfg, progress=not args.quiet, desc=f"train {sample.sample_id}")
        atomic_write_json(conv_dir / "train.json", {
            "sample_id": sample.sample_id, "windows": ids.shape[0], "seq_len": args.seq_len,
            "target_tokens": int((labels != IGNORE_INDEX).sum()), **train.to_dict(),
        })
        result.update(train_tokens=train.tokens, train_seconds=train.seconds,
                      final_loss=train.losses[-1] if train.losses else None, epochs_loss=train.epochs_loss)
        if train.error:
            result["error"] = f"training stopped: {train.error}"
            atomic_write_json(conv_dir / "result.json", result)
            return result
        save_adapter(lm.model, out / "adapters" / sample.sample_id, lora_cfg, base_model=lm.name)
        # Answer through the unmerged LoRA path: merge/unmerge round trips drift the base weights by
        # rounding (visibly in bf16), and every conversation must start from the exact base model.
    answers, seconds = answer_questions(lm, questions, args)
    rows = []
    for qa, pred in zip(questions, answers):
        gold = gold_answer(qa)
        rows.append({"sample_id": sample.sample_id, "question": qa.question, "answer": gold,
                     "category": qa.category, "prediction": pred,
                     "f1": score_qa(pred, gold, qa.category)})
    write_jsonl(conv_dir / "predictions.jsonl", rows)
    result.update(answer_seconds=seconds, f1=aggregate(rows))
    atomic_write_json(conv_dir / "result.json", result)  # written last: marks the conversation finished
    return result


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
        diffs = [f"{k}: saved {old.get(k)!r} vs now {settings.get(k)!r}"
                 for k in RESULT_SETTINGS if old.get(k) != settings.get(k)]
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
        "train_tokens": train_tokens,
        "train_seconds": train_seconds,
        "train_tokens_per_second": train_tokens / train_seconds if train_seconds else None,
        "answer_seconds": answer_seconds,
        "answer_questions_per_second": len(rows) / answer_seconds if answer_seconds else None,
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
    ap.add_argument("--method", choices=["lora", "base"], default="lora",
                    help="lora: train an adapter per conversation; base: the model alone")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="packaged name, local checkpoint dir or hub id")
    ap.add_argument("--data", default=None, help="locomo10.json (else $LOCOMO_DATA, the cache, or a download)")
    ap.add_argument("--out", default=None, help="run directory (default runs/<time>); reuse it to resume")
    ap.add_argument("--conversations", default=None, help="comma-separated sample ids, e.g. conv-26,conv-30")
    ap.add_argument("--max-questions", type=int, default=None, help="first N questions of each conversation")
    ap.add_argument("--with-adversarial", action="store_true", help="also ask category 5 (adversarial) questions")
    ap.add_argument("--timestamps", action="store_true",
                    help="session dates in the training text (the experiment had none)")
    g = ap.add_argument_group("LoRA and training")
    g.add_argument("--train-format", choices=TRAIN_FORMATS, default="text",
                   help="text: next-token loss on the conversation (the experiment); qa: template questions about "
                        "the turns (who said what, when) in the chat format, loss on answers; text+qa: both")
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
    return args


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
        samples = iter_samples(samples, [s.strip() for s in args.conversations.split(",") if s.strip()])
    if args.out is None and dist.world_size > 1:
        raise RunConfigMismatch("--out is required under torchrun (all ranks must write one run directory)")
    out = Path(args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in RESULT_SETTINGS} | {
        "answer_batch_size": args.answer_batch_size, "data": str(data_path),
        "conversations": [s.sample_id for s in samples],
    }
    if args.method == "base":  # these do not apply; keep them out of the resume check
        for k in ("rank", "alpha", "dropout", "use_rslora", "epochs", "lr", "batch_size", "grad_accum",
                  "warmup_ratio", "seq_len", "timestamps", "train_format"):
            settings[k] = None
    if dist.rank == 0:
        check_or_write_run_config(out, settings)
    dist.barrier()
    if dist.rank != 0:
        check_or_write_run_config(out, settings)

    lm = load_model(args.model, device=args.device, dtype=args.dtype, progress=not args.quiet)
    lora_cfg = None
    if args.method == "lora":
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
    for s in todo:
        r = run_conversation(s, lm, lora_cfg, args, out)
        status = f"error: {r['error']}" if r["error"] else f"avg F1 {r['f1']['avg_f1'] or 0:.2f}"
        print(f"[{s.sample_id}] {r['n_questions']} questions, {status}", file=sys.stderr)

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
    from lora_core.adapter_io import AdapterError
    from model.config import ConfigError
    from model.loader import CheckpointError
    from model.packaged import PackagedModelError

    try:
        main()
    except (LocomoDataError, ConfigError, CheckpointError, PackagedModelError, AdapterError, RunConfigMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
