"""The LoRA-Mem experiment on LoCoMo, end to end: one adapter per conversation, questions answered
with no context, scored as LoCoMo scores them; and the context baselines it is placed against.

    python -m bench.locomo --rank 8                 # LoRA-Mem, r=8 (the experiment's main row)
    python -m bench.locomo --method base            # the base model, no adapter, no context
    python -m bench.locomo --method icl             # the latest sessions that fit the context window
    python -m bench.locomo --method rag --top-k 10  # BM25 top-10 turns per question, with their dates
    python -m bench.locomo --method lora+rag --adapters-from runs/locomo-r8   # reuse a run's adapters
    python -m bench.locomo --rank 8 --shared-batches                          # all adapters in one batch

The product (writing a conversation into an adapter, answering from it) is `lora_mem.lora_core.memory`; this
harness adds the data, the baselines, scoring and resumable outputs. Each conversation's outputs land under
`--out` as they finish (atomically); a rerun with the same `--out` skips finished conversations and retries
failed ones, so an interruption loses at most the conversation in progress.

    <out>/run_config.json                      settings of the run (a resume must match them)
    <out>/conversations/<sample_id>/           predictions.jsonl, train.json (loss curve), result.json
    <out>/adapters/<sample_id>/                the adapter, in PEFT format
    <out>/results.json, predictions.jsonl, table.md     the whole run, written at the end
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.common import (
    RunConfigMismatch,
    RunFileError,
    atomic_write_json,
    atomic_write_text,
    check_or_write_run_config,
    read_jsonl,
    read_run_file,
    run_info,
    write_jsonl,
)
from bench.context import CONTEXT_TEMPLATE, RAG_TEMPLATE, RAG_UNITS, BM25Retriever, context_prompt, icl_context
from bench.locomo_data import (
    CATEGORY_NAMES,
    LocomoDataError,
    Sample,
    file_sha256,
    iter_samples,
    load_locomo,
    resolve_data_path,
    select_questions,
    training_source,
)
from bench.locomo_score import aggregate, format_table, score_qa
from lora_mem.cli import (
    Parser,
    fail,
    float_in,
    id_list,
    int_at_least,
    non_negative_int,
    output_dir,
    positive_float,
    positive_int,
)
from lora_mem.kernels.policy import FIELDS_ADDED_LATER, KernelPolicy, add_kernel_args
from lora_mem.lora_core.adapter_io import AdapterError
from lora_mem.lora_core.distill import ANSWER_SOURCES
from lora_mem.lora_core.inject import trainable_summary
from lora_mem.lora_core.memory import (
    ANSWER_MODES,
    Memory,
    MemoryConfig,
    answer_prompts,
    chat_prompts,
    recite_then_answer,
)
from lora_mem.lora_core.recipes import ABSTENTION_STYLES, MIN_SEQ_LEN, QA_SOURCES, TRAIN_PARTS
from lora_mem.model.config import ConfigError, ModelConfig
from lora_mem.model.loader import CheckpointError, LoadedModel, load_model, resolve_checkpoint
from lora_mem.model.packaged import PackagedModelError
from lora_mem.model.tokenizer import Tokenizer

METHODS = ("lora", "base", "icl", "rag", "lora+rag")
DTYPES = ("float32", "bfloat16", "float16")
# Room left in the context window for the chat markup, the question and the answer (ICL).
ICL_RESERVE_TOKENS = 256


@dataclass(frozen=True)
class LocomoConfig:
    """One run of the experiment: the method, what is asked, the memory's settings, the numerics. Defaults: the
    original experiment (its training settings are `MemoryConfig`'s defaults)."""

    method: str = "lora"
    model: str = "smollm2-135m-instruct"
    max_questions: int | None = None  # first N questions of each conversation
    with_adversarial: bool = False
    context_tokens: int | None = None  # icl; None: the model's window - ICL_RESERVE_TOKENS
    top_k: int = 10  # rag
    rag_unit: str = "turn"
    adapters_from: str | None = None  # a lora run whose adapters are used instead of training
    shared_batches: bool = False
    device: str | None = None  # None: cuda if available
    dtype: str | None = None  # None: the kernel policy's (bf16 on CUDA and on a CPU with bf16 instructions, else fp32)
    threads: int | None = None  # torch CPU threads; None: torch's default
    kernels: KernelPolicy = field(default_factory=KernelPolicy)  # which kernels the model runs
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: unknown {self.method!r} (choose from {', '.join(METHODS)})")

    @property
    def uses_adapter(self) -> bool:
        return self.method in ("lora", "lora+rag")

    @property
    def uses_rag(self) -> bool:
        return self.method in ("rag", "lora+rag")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# The command line, mapped onto LocomoConfig in one place. Each option's dest is its key in run_config.json;
# its default is the config's.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    flag: str
    path: str  # attribute path in LocomoConfig
    kwargs: dict
    group: str = "run"

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def train_format(text: str) -> str:
    """A --train-format: parts joined by '+', each once."""
    parts = text.split("+")
    if not text or any(p not in TRAIN_PARTS for p in parts) or len(set(parts)) != len(parts):
        raise argparse.ArgumentTypeError(f"parts joined by '+', each once, from {', '.join(TRAIN_PARTS)}; got "
                                         f"{text!r}")
    return text


OPTIONS = (
    Option("--method", "method", dict(choices=METHODS, help="lora: train an adapter per conversation, ask without "
           "context; base: the model alone; icl: the latest sessions that fit the context window; rag: "
           "BM25-retrieved turns; lora+rag: both adapter and retrieval")),
    Option("--model", "model", dict(help="packaged name, local checkpoint dir or hub id")),
    Option("--max-questions", "max_questions", dict(type=positive_int, help="first N questions of each conversation")),
    Option("--with-adversarial", "with_adversarial", dict(action="store_true",
           help="also ask category 5 (adversarial) questions")),
    Option("--context-tokens", "context_tokens", dict(type=positive_int, help="icl: tokens of conversation in the "
           f"prompt (default: the model's context window - {ICL_RESERVE_TOKENS})"), "context baselines"),
    Option("--top-k", "top_k", dict(type=positive_int, help="rag: turns (or sessions) retrieved per question"),
           "context baselines"),
    Option("--rag-unit", "rag_unit", dict(choices=RAG_UNITS, help="rag: what is retrieved"), "context baselines"),
    Option("--adapters-from", "adapters_from", dict(metavar="RUN_DIR", help="use the adapters a finished lora run "
           "saved (RUN_DIR/adapters/<sample_id>) instead of training; its training settings are taken over"),
           "adapter and training"),
    Option("--shared-batches", "shared_batches", dict(action="store_true", help="answer all conversations' "
           "questions in shared batches, each with its own adapter; predictions equal one adapter at a time"),
           "adapter and training"),
    Option("--train-format", "memory.recipe.train_format", dict(type=train_format, help="parts joined by '+' (e.g. "
           "text+distill): text: next-token loss on the conversation (the experiment); qa: template questions "
           "about quotes and dates; queries: questions covering each turn's statements, several phrasings; "
           "distill: the same questions, matching the base model holding the session in context; recite: the "
           "same questions answered by reciting the turn (for --answer-mode recite)"), "adapter and training"),
    Option("--timestamps", "memory.recipe.timestamps", dict(action="store_true",
           help="session dates in the training text (the experiment had none)"), "adapter and training"),
    Option("--resolve-dates", "memory.recipe.resolve_dates", dict(action="store_true", help="timestamps, and "
           "relative dates in turns resolved from the session date ('yesterday (7 May 2023)')"), "adapter and training"),
    Option("--qa-per-turn", "memory.recipe.qa_per_turn", dict(type=positive_int, help="qa formats: template "
           "questions per turn (default: all, about 3); 1 cuts qa data ~3x"), "adapter and training"),
    Option("--qa-source", "memory.recipe.qa_source", dict(choices=QA_SOURCES, help="qa formats: who writes the "
           "questions: templates over the turns, the base model (one question per turn, kept only if its answer "
           "is in the turn), or both"), "adapter and training"),
    Option("--train-abstention", "memory.recipe.abstention", dict(action="store_true", help="also train 'Not "
           "mentioned in the conversation.' for questions about subjects the conversation never mentions"),
           "adapter and training"),
    Option("--abstention-ratio", "memory.recipe.abstention_ratio", dict(type=float_in(0.0, 1.0),
           help="abstention questions per template question"), "adapter and training"),
    Option("--abstention-style", "memory.recipe.abstention_style", dict(choices=ABSTENTION_STYLES,
           help="unmentioned: questions about subjects the conversation never mentions; contrastive: each question "
                "form asked of the speaker who said a subject and of the other one, who never did"),
           "adapter and training"),
    Option("--queries-per-turn", "memory.recipe.queries_per_turn", dict(type=positive_int, help="queries, "
           "distill, recite: facts asked about per turn"), "adapter and training"),
    Option("--query-phrasings", "memory.recipe.query_phrasings", dict(type=positive_int, help="queries, distill: "
           "phrasings of each fact"), "adapter and training"),
    Option("--distill-top-k", "memory.recipe.distill_top_k", dict(type=positive_int, help="distill: the teacher's "
           "top-k tokens kept per answer position (the rest is one bucket)"), "adapter and training"),
    Option("--distill-temperature", "memory.recipe.distill_temperature", dict(type=positive_float,
           help="distill: softmax temperature of teacher and student"), "adapter and training"),
    Option("--distill-hard-weight", "memory.recipe.distill_hard_weight", dict(type=float_in(0.0, 1.0, low_open=False),
           help="distill: weight of the cross-entropy on the answer tokens beside the KL"), "adapter and training"),
    Option("--distill-answers", "memory.recipe.distill_answers", dict(choices=ANSWER_SOURCES, help="distill: whose "
           "answer tokens the student learns: the teacher's greedy answer, or the query's rule-made answer"),
           "adapter and training"),
    Option("--seq-len", "memory.recipe.seq_len", dict(type=int_at_least(MIN_SEQ_LEN),
           help="tokens per training window"), "adapter and training"),
    Option("--rank", "memory.lora.rank", dict(type=positive_int, help="LoRA rank"), "adapter and training"),
    Option("--alpha", "memory.lora.alpha", dict(type=positive_float, default=None, help="LoRA alpha (default 2 x rank)"),
           "adapter and training"),
    Option("--dropout", "memory.lora.dropout", dict(type=float_in(0.0, 1.0, low_open=False, high_open=True),
           help="dropout on the LoRA branch"), "adapter and training"),
    Option("--use-rslora", "memory.lora.use_rslora", dict(action="store_true",
           help="scale by alpha/sqrt(r) instead of alpha/r"), "adapter and training"),
    Option("--epochs", "memory.train.epochs", dict(type=positive_int), "adapter and training"),
    Option("--lr", "memory.train.lr", dict(type=positive_float, help="peak learning rate (AdamW)"),
           "adapter and training"),
    Option("--batch-size", "memory.train.batch_size", dict(type=positive_int, help="windows per micro-batch"),
           "adapter and training"),
    Option("--grad-accum", "memory.train.grad_accum", dict(type=positive_int, help="micro-batches per optimizer "
           "step"), "adapter and training"),
    Option("--warmup-ratio", "memory.train.warmup_ratio", dict(type=float_in(0.0, 1.0, low_open=False,
           high_open=True), help="share of the steps spent warming up the learning rate"), "adapter and training"),
    Option("--seed", "memory.train.seed", dict(type=non_negative_int), "adapter and training"),
    Option("--grad-checkpointing", "memory.train.gradient_checkpointing", dict(action="store_true",
           help="recompute decoder layers in backward: less memory, ~1/3 more compute"), "adapter and training"),
    Option("--answer-mode", "memory.answer.mode", dict(choices=ANSWER_MODES, help="direct: answer the question; "
           "recite: the adapter first recites the turn the question is about, then the base model answers with "
           "it in context (needs a recipe with the recite part)"), "answering and runtime"),
    Option("--max-new-tokens", "memory.answer.max_new_tokens", dict(type=positive_int), "answering and runtime"),
    Option("--answer-batch-size", "memory.answer.batch_size", dict(type=positive_int, help="questions decoded at "
           "once at most"), "answering and runtime"),
    Option("--answer-memory-mb", "memory.answer.memory_budget_mb", dict(type=positive_float, help="answering's keys, "
           "values and prefill activations stay within this many MiB (fewer rows at once, long prompts prefilled in "
           "passes; the same answers)"), "answering and runtime"),
    Option("--device", "device", dict(choices=("cpu", "cuda"), help="default: cuda if available"),
           "answering and runtime"),
    Option("--dtype", "dtype", dict(choices=DTYPES, help="default: bfloat16 on CUDA and on a CPU with bf16 "
           "instructions (--cpu-bf16), else float32"),
           "answering and runtime"),
    Option("--threads", "threads", dict(type=positive_int, help="torch CPU threads (default: torch's, all cores); "
           "recorded, since CPU numerics depend on it"), "answering and runtime"),
)
OPTION_BY_DEST = {o.dest: o for o in OPTIONS}

# Settings that change results: a resumed run must agree on all of them.
RESULT_SETTINGS = (
    "method", "model", "dtype", "rank", "alpha", "dropout", "use_rslora", "epochs", "lr", "batch_size",
    "grad_accum", "warmup_ratio", "seq_len", "seed", "max_new_tokens", "max_questions", "with_adversarial",
    "timestamps", "train_format", "context_tokens", "top_k", "rag_unit", "adapters_from",
    "resolve_dates", "qa_per_turn", "train_abstention", "abstention_ratio", "qa_source", "abstention_style",
    "device_type", "threads", "data_sha256", "queries_per_turn", "query_phrasings", "distill_top_k",
    "distill_temperature", "distill_hard_weight", "distill_answers", "answer_mode", "kernel_policy",
)
# Settings newer than the first runs, with the value an older run_config.json implies.
SETTINGS_ADDED_LATER = {"train_format": "text", "context_tokens": None, "top_k": None, "rag_unit": None,
                        "adapters_from": None, "resolve_dates": False, "qa_per_turn": None,
                        "train_abstention": False, "abstention_ratio": None, "qa_source": "templates",
                        "abstention_style": "unmentioned", "queries_per_turn": None, "query_phrasings": None,
                        "distill_top_k": None, "distill_temperature": None, "distill_hard_weight": None,
                        "distill_answers": None, "answer_mode": "direct", "kernel_policy": FIELDS_ADDED_LATER}
# Recorded only by newer runs; an older run_config.json that lacks them resumes without the check.
RECORDED_LATER = ("device_type", "threads", "data_sha256", "kernel_policy")
TRAINING_SETTINGS = ("rank", "alpha", "dropout", "use_rslora", "epochs", "lr", "batch_size", "grad_accum",
                     "warmup_ratio", "seq_len", "timestamps", "train_format", "resolve_dates", "qa_per_turn",
                     "train_abstention", "abstention_ratio", "qa_source", "abstention_style", "queries_per_turn",
                     "query_phrasings", "distill_top_k", "distill_temperature", "distill_hard_weight",
                     "distill_answers")
QUERY_SETTINGS = ("queries_per_turn", "query_phrasings")
DISTILL_SETTINGS = ("distill_top_k", "distill_temperature", "distill_hard_weight", "distill_answers")
QA_SOURCE_LABELS = {"model": "the base model", "both": "templates + base model"}


def config_value(config, path: str):
    for name in path.split("."):
        config = getattr(config, name)
    return config


def config_with(config, path: str, value):
    """A copy of the (nested, frozen) config with the field at ``path`` set to ``value``."""
    head, _, rest = path.partition(".")
    if not rest:
        return dataclasses.replace(config, **{head: value})
    return dataclasses.replace(config, **{head: config_with(getattr(config, head), rest, value)})


def config_from(values: dict, config: LocomoConfig) -> LocomoConfig:
    """``config`` with the options in ``values`` (option dest -> value) set. Each nested config is rebuilt once
    with all its new values, so its checks see the final combination (ValueError names the field)."""
    by_parent: dict[str, dict] = {}
    for dest, value in values.items():
        parent, _, name = OPTION_BY_DEST[dest].path.rpartition(".")
        by_parent.setdefault(parent, {})[name] = value
    for parent in sorted(by_parent, key=lambda p: -p.count(".")):  # the deepest first
        if parent:
            config = config_with(config, parent, dataclasses.replace(config_value(config, parent), **by_parent[parent]))
        else:
            config = dataclasses.replace(config, **by_parent[parent])
    return config


def build_parser() -> Parser:
    ap = Parser(prog="python -m bench.locomo", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                description="LoRA-Mem on LoCoMo: one LoRA adapter per conversation, questions answered without "
                            "context.")
    ap.add_argument("--data", default=None, help="a LoCoMo-layout JSON file (else $LOCOMO_DATA, the cache, or a "
                                                  "pinned download of locomo10.json)")
    ap.add_argument("--out", type=output_dir, default=None,
                    help="run directory (default runs/<time>); reuse it to resume")
    ap.add_argument("--conversations", type=id_list, default=None,
                    help="comma-separated sample ids, e.g. conv-26,conv-30")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    defaults = LocomoConfig()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for o in OPTIONS:
        group = groups.get(o.group) or groups.setdefault(o.group, ap.add_argument_group(o.group))
        kwargs = {"default": config_value(defaults, o.path), **o.kwargs}  # an option may name its own default
        group.add_argument(o.flag, dest=o.dest, **kwargs)
    add_kernel_args(ap)
    return ap


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, LocomoConfig]:
    """The run inputs (--data, --out, --conversations, --quiet) and the config; bad values exit with one line."""
    ap = build_parser()
    args = ap.parse_args(argv)
    try:  # the dataclasses check what single options cannot (combinations); the kernel policy reads LORA_MEM_*
        config = config_from({o.dest: getattr(args, o.dest) for o in OPTIONS}, LocomoConfig())
        config = dataclasses.replace(config, kernels=KernelPolicy.from_args(args))
    except ValueError as e:
        ap.error(str(e).replace("qa_source=", "--qa-source "))
    if (config.adapters_from or config.shared_batches) and not config.uses_adapter:
        ap.error(f"--adapters-from and --shared-batches need an adapter method (lora, lora+rag), not {config.method}")
    if config.memory.answer.mode == "recite" and (config.method != "lora" or config.shared_batches):
        ap.error("--answer-mode recite answers with the adapter's own recitation: method lora, no --shared-batches")
    if config.memory.answer.mode == "recite" and not config.adapters_from \
            and "recite" not in config.memory.recipe.parts:
        ap.error(f"--answer-mode recite needs an adapter trained to recite (a --train-format with recite, got "
                 f"{config.memory.recipe.train_format})")
    return args, config



def settings_of(config: LocomoConfig) -> dict:
    """The config flattened to option names (the keys of run_config.json), settings that do not apply set to
    None (so that they cannot block a resume)."""
    settings = {o.dest: config_value(config, o.path) for o in OPTIONS}
    not_applicable: tuple[str, ...] = ()
    if not config.uses_adapter:
        not_applicable += TRAINING_SETTINGS + ("adapters_from",)
    if config.method != "icl":
        not_applicable += ("context_tokens",)
    if not config.uses_rag:
        not_applicable += ("top_k", "rag_unit")
    if not config.memory.recipe.abstention:
        not_applicable += ("abstention_ratio", "abstention_style")
    if not config.memory.recipe.uses_queries:
        not_applicable += QUERY_SETTINGS
    if "distill" not in config.memory.recipe.parts:
        not_applicable += DISTILL_SETTINGS
    for k in not_applicable:
        settings[k] = None
    return settings


def method_label(config: LocomoConfig) -> str:
    label = _method_label(config)
    return label + " [+cat 5]" if config.with_adversarial else label  # also asked the adversarial questions


def _method_label(config: LocomoConfig) -> str:
    rag = f"RAG (BM25 top-{config.top_k} {config.rag_unit}s)" if config.uses_rag else ""
    if config.method == "base":
        return "Base (no context)"
    if config.method == "icl":
        return f"ICL (latest {config.context_tokens} tokens)"
    if config.method == "rag":
        return rag
    r = config.memory.recipe
    extras = "".join([", timestamps" if r.timestamps and not r.resolve_dates else "",
                      ", timestamps+dates" if r.resolve_dates else "",
                      f", {r.train_format}" if r.train_format != "text" else "",
                      f" ({r.qa_per_turn}/turn)" if r.qa_per_turn and r.train_format != "text" else "",
                      f" by {QA_SOURCE_LABELS[r.qa_source]}" if r.qa_source != "templates" else "",
                      f", {'contrastive ' if r.abstention_style == 'contrastive' else ''}abstention "
                      f"{r.abstention_ratio:g}" if r.abstention else "",
                      # text format: the template pool that sets how many abstention pairs there are
                      f" ({r.qa_per_turn}/turn)" if r.qa_per_turn and r.train_format == "text" and r.abstention
                      else "",
                      f", answers from {r.distill_answers}" if "distill" in r.parts else "",
                      ", recite-then-answer" if config.memory.answer.mode == "recite" else ""])
    lora = f"LoRA-Mem (r={config.memory.lora.rank}{extras})"
    return f"{lora} + {rag}" if config.method == "lora+rag" else lora


class ContextTooLong(ValueError):
    pass


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run that has its --out: what finished is kept there."""

    def __init__(self, out: Path):
        super().__init__(str(out))
        self.out = out


# ---------------------------------------------------------------------------------------------
# One conversation
# ---------------------------------------------------------------------------------------------

def question_prompts(sample: Sample, questions: list, lm: LoadedModel, config: LocomoConfig) -> tuple[list, dict]:
    """The chat prompt of each question for the method (token ids), and what context went in.

    Every method asks the same instruction; icl and rag put the conversation (or retrieved turns)
    ahead of it in the same user turn."""
    tok = lm.tokenizer
    asks = [config.memory.answer.question_template.format(question=q.question) for q in questions]
    info: dict = {}
    if config.method == "icl":
        ctx = icl_context(sample, tok, config.context_tokens)
        users = [context_prompt(CONTEXT_TEMPLATE, sample, ctx.text, a) for a in asks]
        info = {"context_tokens": ctx.tokens, "sessions_kept": ctx.sessions_kept, "sessions_total": ctx.sessions_total,
                "turns_kept": ctx.turns_kept, "turns_total": ctx.turns_total}
    elif config.uses_rag:
        retriever = BM25Retriever(sample, config.rag_unit)
        hits = retriever.retrieve([q.question for q in questions], config.top_k)
        users = [context_prompt(RAG_TEMPLATE, sample, retriever.context(h), a) for h, a in zip(hits, asks)]
        info = {"retrieved": hits, "documents": len(retriever.docs)}
    else:
        users = asks
    prompts = chat_prompts(lm, users)
    limit, new = lm.config.max_position_embeddings, config.memory.answer.max_new_tokens
    longest = max((len(p) for p in prompts), default=0)
    if longest + new > limit:
        raise ContextTooLong(f"{sample.sample_id}: a prompt of {longest} tokens + {new} new tokens exceeds the "
                             f"model's context of {limit} positions (lower --top-k or --context-tokens)")
    return prompts, info


def gold_answer(qa) -> str:
    return qa.answer if qa.category != 5 else (qa.adversarial_answer or qa.answer or "")


def adapter_dir(out: Path, config: LocomoConfig, sample_id: str) -> Path:
    return (Path(config.adapters_from) if config.adapters_from else out) / "adapters" / sample_id


def prepare_adapter(sample: Sample, memory: Memory, config: LocomoConfig, out: Path, quiet: bool) -> dict:
    """Put this conversation's adapter into the model: trained here (and saved), taken from an earlier
    invocation of this run (resume), or from another run (--adapters-from). Returns result fields; a
    conversation whose training failed carries "error" and has no saved adapter (a resume retrains it)."""
    conv_dir = out / "conversations" / sample.sample_id
    path = adapter_dir(out, config, sample.sample_id)
    if config.adapters_from:
        memory.load(path)
        return {"adapter": str(path)}
    train_file = conv_dir / "train.json"
    train = read_run_file(train_file) if train_file.is_file() else None
    if train is not None and not train.get("error") and path.is_dir():  # trained by an earlier invocation
        memory.load(path)
    else:
        written = memory.write(training_source(sample), progress=not quiet)
        train = {**written.to_dict(), "seq_len": config.memory.recipe.seq_len}
        if written.error is None:
            memory.save(path)
        atomic_write_json(train_file, train)  # after the adapter: marks it complete
    fields = {"train_tokens": train["tokens"], "train_seconds": train["seconds"],
              "data_seconds": train.get("data_seconds", 0.0), "teacher_seconds": train.get("teacher_seconds", 0.0),
              "final_loss": train["losses"][-1] if train["losses"] else None, "epochs_loss": train["epochs_loss"]}
    if train.get("error"):
        fields["error"] = f"training failed: {train['error']}"
    return fields


def finish_conversation(sample: Sample, questions: list, answers: list[str], prompts: list[list[int]],
                        context: dict, result: dict, seconds: float, out: Path) -> dict:
    """Score and write one conversation's predictions; result.json last, as the 'finished' mark. Lists in
    ``context`` under "retrieved" / "recitation" are per question and go into the predictions' rows."""
    conv_dir = out / "conversations" / sample.sample_id
    per_question = {k: context.pop(k) for k in ("retrieved", "recitation") if k in context}
    rows = []
    for i, (qa, pred) in enumerate(zip(questions, answers)):
        gold = gold_answer(qa)
        row = {"sample_id": sample.sample_id, "question": qa.question, "answer": gold,
               "category": qa.category, "prediction": pred, "f1": score_qa(pred, gold, qa.category),
               "prompt_tokens": len(prompts[i])}
        row.update({k: v[i] for k, v in per_question.items()})
        rows.append(row)
    write_jsonl(conv_dir / "predictions.jsonl", rows)
    result.update(answer_seconds=seconds, f1=aggregate(rows), context=context or None,
                  prompt_tokens_mean=sum(len(p) for p in prompts) / max(len(prompts), 1))
    atomic_write_json(conv_dir / "result.json", result)
    return result


def record_failure(out: Path, result: dict) -> dict:
    """A failed conversation's result.json: reported, never scored, and retried by a resume."""
    atomic_write_json(out / "conversations" / result["sample_id"] / "result.json", result)
    return result


def answer(lm: LoadedModel, prompts: list[list[int]], config: LocomoConfig, quiet: bool,
           adapter_ids: list[int] | None = None) -> tuple[list[str], float]:
    t0 = time.perf_counter()
    answers = answer_prompts(lm, prompts, config.memory.answer, adapter_ids, progress=not quiet)
    return answers, time.perf_counter() - t0


def run_conversation(sample: Sample, lm: LoadedModel, memory: Memory | None, config: LocomoConfig, out: Path,
                     quiet: bool) -> dict:
    questions = select_questions(sample, config.with_adversarial, config.max_questions)
    result: dict = {"sample_id": sample.sample_id, "n_questions": len(questions), "error": None}
    if memory is not None:
        result.update(prepare_adapter(sample, memory, config, out, quiet))
        if result["error"]:
            return record_failure(out, result)
    if config.memory.answer.mode == "recite":
        t0 = time.perf_counter()
        answers, recitations, prompts = recite_then_answer(lm, [q.question for q in questions], config.memory.answer,
                                                           progress=not quiet)
        return finish_conversation(sample, questions, answers, prompts, {"recitation": recitations}, result,
                                   time.perf_counter() - t0, out)
    prompts, context = question_prompts(sample, questions, lm, config)
    answers, seconds = answer(lm, prompts, config, quiet)
    return finish_conversation(sample, questions, answers, prompts, context, result, seconds, out)


def run_shared_batches(samples: list[Sample], lm: LoadedModel, memory: Memory, config: LocomoConfig, out: Path,
                       quiet: bool) -> list[dict]:
    """Every conversation's adapter first, then all their questions in shared batches, each question
    answered by its own conversation's adapter (stacked; lora_mem/kernels/multi_lora_linear.py)."""
    results, ready = [], []
    for s in samples:
        questions = select_questions(s, config.with_adversarial, config.max_questions)
        result = {"sample_id": s.sample_id, "n_questions": len(questions), "error": None,
                  **prepare_adapter(s, memory, config, out, quiet)}
        if result["error"]:
            results.append(record_failure(out, result))
        else:
            ready.append((s, questions, result))
    if not ready:
        return results
    with memory.stacked([adapter_dir(out, config, s.sample_id) for s, _, _ in ready]):
        prompts, owners, contexts = [], [], []
        for i, (s, questions, _) in enumerate(ready):
            p, ctx = question_prompts(s, questions, lm, config)
            prompts += p
            owners += [i] * len(p)
            contexts.append(ctx)
        answers, seconds = answer(lm, prompts, config, quiet, adapter_ids=owners)
    start = 0
    for (s, questions, result), ctx in zip(ready, contexts):
        n = len(questions)
        result["answered_in_shared_batches"] = True  # answer_seconds: this conversation's share of the time
        results.append(finish_conversation(s, questions, answers[start:start + n], prompts[start:start + n], ctx,
                                           result, seconds * n / max(len(prompts), 1), out))
        start += n
    return results


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def conversation_state(out: Path, sample_id: str) -> str:
    """"finished", "failed" or "todo", from the conversation's files (any unreadable one is an error, found
    before any work starts)."""
    conv_dir = out / "conversations" / sample_id
    if (conv_dir / "train.json").is_file():
        read_run_file(conv_dir / "train.json")
    if not (conv_dir / "result.json").is_file():
        return "todo"
    return "failed" if read_run_file(conv_dir / "result.json").get("error") else "finished"


def collect(out: Path, samples: list[Sample]) -> tuple[list[dict], list[dict]]:
    results, rows = [], []
    for s in samples:
        conv_dir = out / "conversations" / s.sample_id
        result = read_run_file(conv_dir / "result.json")
        results.append(result)
        if not result.get("error") and (conv_dir / "predictions.jsonl").is_file():
            rows += read_jsonl(conv_dir / "predictions.jsonl")
    return results, rows


def summarise(out: Path, samples: list[Sample], lm: LoadedModel, config: LocomoConfig, settings: dict, wall: float,
              info: dict) -> dict:
    conv_results, rows = collect(out, samples)
    write_jsonl(out / "predictions.jsonl", rows)
    scores = aggregate(rows)
    failed = {r["sample_id"]: r["error"] for r in conv_results if r.get("error")}
    train_tokens = sum(r.get("train_tokens", 0) for r in conv_results)
    train_seconds = sum(r.get("train_seconds", 0.0) for r in conv_results)
    data_seconds = sum(r.get("data_seconds", 0.0) for r in conv_results)
    teacher_seconds = sum(r.get("teacher_seconds", 0.0) for r in conv_results)
    answer_seconds = sum(r.get("answer_seconds", 0.0) for r in conv_results)
    label = method_label(config)
    if failed:
        label += f" (INCOMPLETE: {len(failed)} of {len(samples)} conversations failed)"
    # A resumed run took the time of every invocation; a no-op resume (all finished) adds ~nothing.
    previous = read_run_file(out / "results.json") if (out / "results.json").is_file() else {}
    wall_total = previous.get("wall_seconds_all_invocations", previous.get("wall_seconds_this_invocation", 0.0)) + wall
    results = {
        "method": label,
        "settings": settings,
        "config": config.to_dict(),
        "question_template": config.memory.answer.question_template,
        "model": {"name": lm.name, "path": str(lm.path), "config": lm.config.to_dict()},
        **info,
        "scores": scores,
        "categories": {str(k): v for k, v in CATEGORY_NAMES.items()},
        "n_conversations": len(samples),
        "failed": failed,
        "errors": failed,
        "wall_seconds_this_invocation": wall,
        "wall_seconds_all_invocations": wall_total,
        "train_tokens": train_tokens,
        "train_seconds": train_seconds,
        "train_tokens_per_second": train_tokens / train_seconds if train_seconds else None,
        "data_seconds": data_seconds,  # building the training data, the teacher's part included
        "teacher_seconds": teacher_seconds,
        "answer_seconds": answer_seconds,
        "answer_questions_per_second": len(rows) / answer_seconds if answer_seconds else None,
        "prompt_tokens_mean": sum(r["prompt_tokens"] for r in rows) / len(rows) if rows else None,
        "prompt_tokens_max": max((r["prompt_tokens"] for r in rows), default=None),
        "compute_seconds": data_seconds + train_seconds + answer_seconds,
        "conversations": conv_results,
    }
    results = json.loads(json.dumps(results, default=str))  # what the file holds (str keys)
    atomic_write_json(out / "results.json", results)
    table = format_table([(label, scores)])
    if failed:
        table += "\n\n" + "\n".join(f"FAILED {sid}: {err}" for sid, err in failed.items())
    atomic_write_text(out / "table.md", table + "\n")
    return results


def take_over_training_settings(config: LocomoConfig) -> LocomoConfig:
    """--adapters-from: the adapters were trained with the source run's settings; record those."""
    path = Path(config.adapters_from) / "run_config.json"
    if not path.is_file():
        raise RunConfigMismatch(f"--adapters-from {config.adapters_from}: no run_config.json (not a bench.locomo run)")
    source = read_run_file(path)
    if source.get("method") not in ("lora", "lora+rag"):
        raise RunConfigMismatch(f"--adapters-from {config.adapters_from}: a {source.get('method')!r} run has no adapters")
    if source.get("model") != config.model:
        raise RunConfigMismatch(f"--adapters-from {config.adapters_from}: adapters of model {source.get('model')!r}, "
                                f"this run uses {config.model!r}")
    values = {}
    for k in TRAINING_SETTINGS + ("seed",):
        value = source[k] if k in source else SETTINGS_ADDED_LATER.get(k)  # added later: it was off there
        if value is not None or k not in ("abstention_ratio", "abstention_style") + QUERY_SETTINGS + DISTILL_SETTINGS:
            # None: it did not apply there (the default stays)
            values[k] = value
    return config_from(values | {"adapters_from": str(Path(config.adapters_from))}, config)


def check_seq_len(config: LocomoConfig, tok: Tokenizer) -> None:
    """A chat-QA window holds the system turn and at least one short exchange; say so before any work."""
    recipe = config.memory.recipe
    if not config.uses_adapter or config.adapters_from or not recipe.uses_chat:
        return
    system = tok.default_system_prompt
    head = len(tok.encode(tok.format_chat([{"role": "system", "content": system}], add_generation_prompt=False))
               if system is not None else "")
    exchange = len(tok.encode("<|im_start|>user\n" + config.memory.answer.question_template.format(question="Who?")
                              + "<|im_end|>\n<|im_start|>assistant\nYes<|im_end|>\n"))
    if head + exchange > recipe.seq_len:
        raise RunConfigMismatch(f"--seq-len {recipe.seq_len} is too small for one chat window of this model "
                                f"({head} tokens of system turn + {exchange} of the shortest exchange): use at least "
                                f"{head + exchange}")


# ---------------------------------------------------------------------------------------------
# Scale-out: under torchrun each rank takes every world_size-th conversation; rank 0 gathers.
# ---------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def init_distributed(config: LocomoConfig) -> tuple[Dist, LocomoConfig]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(), config
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and config.device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        config = dataclasses.replace(config, device=f"cuda:{local_rank}")
    else:
        config = dataclasses.replace(config, device="cpu")
        if config.threads is None:  # CPU ranks share the machine's cores instead of each taking all of them
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            config = dataclasses.replace(config, threads=max(1, (os.cpu_count() or 1) // local))
    # A rank may wait at the final barrier while another trains for a long time.
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=24))
    return Dist(rank, world_size), config


def main(argv: list[str] | None = None) -> dict | None:
    args, config = parse_args(argv)
    t_start = time.perf_counter()
    dist, config = init_distributed(config)
    try:
        return run(args, config, dist, t_start)
    finally:
        if dist.world_size > 1:
            torch.distributed.destroy_process_group()


def run(args: argparse.Namespace, config: LocomoConfig, dist: Dist, t_start: float) -> dict | None:
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    data_path = resolve_data_path(args.data)
    samples = load_locomo(data_path)
    if args.conversations:
        samples = iter_samples(samples, args.conversations)
    if args.out is None and dist.world_size > 1:
        raise RunConfigMismatch("--out is required under torchrun (all ranks must write one run directory)")
    out = Path(args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if config.adapters_from:
        config = take_over_training_settings(config)
        if config.memory.answer.mode == "recite" and "recite" not in config.memory.recipe.parts:
            raise RunConfigMismatch(f"--answer-mode recite: the adapters of {config.adapters_from} were not trained "
                                    f"to recite (train_format {config.memory.recipe.train_format})")
        missing = [s.sample_id for s in samples if not adapter_dir(out, config, s.sample_id).is_dir()]
        if missing:
            raise RunConfigMismatch(f"--adapters-from {config.adapters_from}: no adapter for {', '.join(missing)}")

    # Everything that can be refused is checked before the weights load and before --out is written.
    ckpt = resolve_checkpoint(config.model)
    model_config = ModelConfig.from_file(ckpt / "config.json")
    check_seq_len(config, Tokenizer.from_dir(ckpt, model_config))
    if config.method == "icl" and config.context_tokens is None:
        config = dataclasses.replace(config, context_tokens=model_config.max_position_embeddings - ICL_RESERVE_TOKENS)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = settings_of(config) | {
        "data": str(data_path), "data_sha256": file_sha256(data_path), "device_type": device.type,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "kernel_policy": config.kernels.to_dict(), "conversations": [s.sample_id for s in samples],
    }
    check_or_write_run_config(out, settings, RESULT_SETTINGS, SETTINGS_ADDED_LATER, RECORDED_LATER, write=False)
    states = {s.sample_id: conversation_state(out, s.sample_id) for s in samples}
    if dist.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        check_or_write_run_config(out, settings, RESULT_SETTINGS, SETTINGS_ADDED_LATER, RECORDED_LATER)
    dist.barrier()

    lm = load_model(config.model, device=device, dtype=config.dtype, progress=not args.quiet, policy=config.kernels)
    memory = None
    if config.uses_adapter:
        memory = Memory(lm, config.memory)
        if dist.rank == 0:
            print(trainable_summary(lm.model), file=sys.stderr)
    info = run_info(lm.model.lm_head.weight.device, config.kernels)
    info["dtype"] = str(lm.model.lm_head.weight.dtype).replace("torch.", "")

    todo = [s for s in samples[dist.rank::dist.world_size] if states[s.sample_id] != "finished"]
    retried = [s.sample_id for s in todo if states[s.sample_id] == "failed"]
    if len(todo) < len(samples) and dist.world_size == 1:
        print(f"resuming {out}: {len(samples) - len(todo)} of {len(samples)} conversations already finished"
              + (f"; retrying failed {', '.join(retried)}" if retried else ""), file=sys.stderr)
    try:
        if config.shared_batches:
            done = run_shared_batches(todo, lm, memory, config, out, args.quiet)
        else:
            done = (run_conversation(s, lm, memory, config, out, args.quiet) for s in todo)
        for r in done:
            status = f"FAILED: {r['error']}" if r["error"] else f"avg F1 {r['f1']['avg_f1'] or 0:.2f}"
            print(f"[{r['sample_id']}] {r['n_questions']} questions, {status}", file=sys.stderr)
    except KeyboardInterrupt as e:
        raise Interrupted(out) from e

    dist.barrier()
    if dist.rank != 0:
        return None
    info["world_size"] = dist.world_size
    results = summarise(out, samples, lm, config, settings, time.perf_counter() - t_start, info)
    print(format_table([(results["method"], results["scores"])]))
    for sid, err in results["failed"].items():
        print(f"FAILED {sid}: {err} (rerun the same command to retry it)")
    print(f"\nresults: {out / 'results.json'}  (wall {results['wall_seconds_this_invocation']:.0f}s)")
    return results


def cli() -> None:
    """main() with the project's input errors as one clear line, an interruption as a line on how to resume,
    and a non-zero exit status when a conversation failed."""
    try:
        results = main()
    except (LocomoDataError, ConfigError, CheckpointError, PackagedModelError, AdapterError, RunConfigMismatch,
            ContextTooLong, RunFileError) as e:
        fail(str(e))
    except Interrupted as e:
        fail(f"interrupted: finished conversations are kept in {e.out}; rerun with --out {e.out} (and the same "
             "settings) to resume", 130)
    except KeyboardInterrupt:
        fail("interrupted before the run started: nothing was written", 130)
    if results is not None and results["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    cli()
