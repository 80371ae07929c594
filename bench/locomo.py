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
failed ones, so an interruption loses at most the conversation in progress. Every input (options, data, model files,
an earlier invocation's files in --out) is checked before the model loads, and nothing is written before that.

    <out>/run_config.json                      settings of the run (a resume must match them)
    <out>/conversations/<sample_id>/           predictions.jsonl, train.json (loss curve), result.json
    <out>/adapters/<sample_id>/                the adapter, in PEFT format
    <out>/results.json, predictions.jsonl, table.md     the whole run, written at the end
(bench/locomo_files.py: these files' schemas, and the check of --out.)
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
    read_run_file,
    run_info,
    write_jsonl,
)
from bench.context import (
    CONTEXT_TEMPLATE,
    FACT_TEMPLATE,
    RAG_TEMPLATE,
    RAG_UNITS,
    BM25Retriever,
    context_prompt,
    cut_to_fit,
    icl_context,
)
from bench.locomo_data import (
    CATEGORY_NAMES,
    LocomoDataError,
    Sample,
    iter_samples,
    load_locomo,
    resolve_data_path,
    select_questions,
)
from bench.locomo_files import (
    OutState,
    conversation_dir,
    inspect_out,
    read_predictions,
    read_result,
    read_train,
)
from bench.locomo_files import adapter_dir as run_adapter_dir
from bench.locomo_score import aggregate, format_table, score_qa
from lora_mem.cli import (
    Parser,
    device_name,
    fail,
    float_in,
    id_list,
    int_at_least,
    output_dir,
    positive_float,
    positive_int,
    positive_int_or_all,
    seed,
    threads,
    train_format,
)
from lora_mem.files import file_sha256
from lora_mem.kernels.policy import DTYPE_DEFAULT_HELP, FIELDS_ADDED_LATER, KernelPolicy, add_kernel_args
from lora_mem.lora_core.adapter_io import AdapterError, linear_layers, read_adapter
from lora_mem.lora_core.conversation import conversation_only
from lora_mem.lora_core.distill import ANSWER_SOURCES
from lora_mem.lora_core.inject import is_target, trainable_summary
from lora_mem.lora_core.memory import (
    ANSWER_MODES,
    RECITE_MAX_NEW_TOKENS,
    RECITED_CONTEXT,
    Memory,
    MemoryConfig,
    answer_prompts,
    chat_prompts,
    recite_then_answer,
)
from lora_mem.deps import MissingDependency
from lora_mem.lora_core.parser import ParserError
from lora_mem.lora_core.parser import check_installed as check_parser_installed
from lora_mem.lora_core.recipes import ABSTENTION_STYLES, MIN_SEQ_LEN, QA_SOURCES, QUERY_SOURCES, RECITE_TEMPLATE
from lora_mem.model.config import ConfigError
from lora_mem.model.loader import Checkpoint, CheckpointError, LoadedModel, inspect_checkpoint, load_model
from lora_mem.model.packaged import PackagedModelError
from lora_mem.model.tokenizer import Tokenizer, TokenizerError
from lora_mem.untrusted import UnsafeNameError, UnsafePathError

METHODS = ("lora", "base", "icl", "rag", "lora+rag", "fact-rag", "lora+fact-rag")
DTYPES = ("float32", "bfloat16", "float16")
# Room left in the context window for the chat markup, the question and the answer (ICL).
ICL_RESERVE_TOKENS = 256
# Retrieved text cut to fit the window keeps this many tokens spare: where it meets the text around it, tokens may
# merge differently than in the parts counted alone.
BOUNDARY_TOKENS = 8


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
        return self.method.startswith("lora")

    @property
    def uses_rag(self) -> bool:
        return self.method.endswith("rag")

    @property
    def retrieval_unit(self) -> str:
        """What retrieval retrieves: the parser-built facts for the fact-rag methods, else --rag-unit."""
        return "fact" if self.method.endswith("fact-rag") else self.rag_unit

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# The command line, mapped onto LocomoConfig in one place. Each option's dest is its key in run_config.json;
# its default is the config's.
# ---------------------------------------------------------------------------------------------

# The groups of --help: what a user tunes first; the recipes chosen against last, runnable for the docs' rows.
RUN, CONTEXT, TRAINING, ANSWERING = "run", "context baselines", "adapter and training", "answering and runtime"
EXPERIMENTS = "experiments (recipes chosen against; they reproduce the rows of docs/)"
GROUPS = (RUN, TRAINING, ANSWERING, CONTEXT, EXPERIMENTS)


@dataclass(frozen=True)
class Option:
    flag: str
    path: str  # attribute path in LocomoConfig
    kwargs: dict
    group: str = RUN
    result: bool = True  # whether it changes results (a resumed run must agree on it)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


OPTIONS = (
    Option("--method", "method", dict(choices=METHODS, help="lora: train an adapter per conversation, ask without "
           "context; base: the model alone; icl: the latest sessions that fit the context window; rag: "
           "BM25-retrieved turns; lora+rag: both adapter and retrieval; fact-rag: BM25-retrieved facts (the "
           "parser-built question-answer pairs, an external store of what the adapters learn); lora+fact-rag: both")),
    Option("--model", "model", dict(help="packaged name, local checkpoint dir or hub id")),
    Option("--max-questions", "max_questions", dict(type=positive_int, help="first N questions of each conversation")),
    Option("--with-adversarial", "with_adversarial", dict(action="store_true",
           help="also ask category 5 (adversarial) questions")),
    Option("--context-tokens", "context_tokens", dict(type=positive_int, help="icl: tokens of conversation in the "
           f"prompt (default: the model's context window - {ICL_RESERVE_TOKENS})"), CONTEXT),
    Option("--top-k", "top_k", dict(type=positive_int, help="rag: turns (or sessions) retrieved per question"),
           CONTEXT),
    Option("--rag-unit", "rag_unit", dict(choices=RAG_UNITS, help="rag: what is retrieved"), CONTEXT),
    Option("--adapters-from", "adapters_from", dict(metavar="RUN_DIR", help="use the adapters a finished lora run "
           "saved (RUN_DIR/adapters/<sample_id>) instead of training; its training settings are taken over"),
           TRAINING),
    Option("--shared-batches", "shared_batches", dict(action="store_true", help="answer all conversations' "
           "questions in shared batches, each with its own adapter; predictions equal one adapter at a time"),
           TRAINING, result=False),
    Option("--train-format", "memory.recipe.train_format", dict(type=train_format, help="parts joined by '+' (e.g. "
           "text+distill): text: next-token loss on the conversation (the experiment); qa: template questions "
           "about quotes and dates; queries: questions covering each turn's statements, several phrasings; "
           "distill: the same questions, matching the base model holding the session in context; recite: the "
           "same questions answered by reciting the turn (for --answer-mode recite)"), TRAINING),
    Option("--timestamps", "memory.recipe.timestamps", dict(action="store_true",
           help="session dates in the training text (the experiment had none)"), EXPERIMENTS),
    Option("--resolve-dates", "memory.recipe.resolve_dates", dict(action="store_true", help="timestamps, and "
           "relative dates in turns resolved from the session date ('yesterday (7 May 2023)')"), EXPERIMENTS),
    Option("--qa-per-turn", "memory.recipe.qa_per_turn", dict(type=positive_int, help="qa formats: template "
           "questions per turn (default: all, about 3); 1 cuts qa data ~3x"), EXPERIMENTS),
    Option("--qa-source", "memory.recipe.qa_source", dict(choices=QA_SOURCES, help="qa formats: who writes the "
           "questions: templates over the turns, the base model (one question per turn, kept only if its answer "
           "is in the turn), or both"), EXPERIMENTS),
    Option("--train-abstention", "memory.recipe.abstention", dict(action="store_true", help="also train 'Not "
           "mentioned in the conversation.' for questions about subjects the conversation never mentions"),
           EXPERIMENTS),
    Option("--abstention-ratio", "memory.recipe.abstention_ratio", dict(type=float_in(0.0, 1.0),
           help="abstention questions per template question"), EXPERIMENTS),
    Option("--abstention-style", "memory.recipe.abstention_style", dict(choices=ABSTENTION_STYLES,
           help="unmentioned: questions about subjects the conversation never mentions; contrastive: each question "
                "form asked of the speaker who said a subject and of the other one, who never did"),
           EXPERIMENTS),
    Option("--queries-per-turn", "memory.recipe.queries_per_turn", dict(type=positive_int_or_all, help="queries, "
           "distill, recite: facts asked about per turn ('all': every one)"), TRAINING),
    Option("--query-phrasings", "memory.recipe.query_phrasings", dict(type=positive_int, help="queries, distill: "
           "phrasings of each fact"), TRAINING),
    Option("--queries-from", "memory.recipe.queries_from", dict(choices=QUERY_SOURCES, help="queries, distill, "
           "recite: what reads the turns: rules (regular expressions) or parser (spaCy's dependency parse, every "
           "clause's constituents asked; needs the facts extra)"), TRAINING),
    Option("--distill-top-k", "memory.recipe.distill_top_k", dict(type=positive_int, help="distill: the teacher's "
           "top-k tokens kept per answer position (the rest is one bucket)"), EXPERIMENTS),
    Option("--distill-temperature", "memory.recipe.distill_temperature", dict(type=positive_float,
           help="distill: softmax temperature of teacher and student"), EXPERIMENTS),
    Option("--distill-hard-weight", "memory.recipe.distill_hard_weight", dict(type=float_in(0.0, 1.0, low_open=False),
           help="distill: weight of the cross-entropy on the answer tokens beside the KL"), EXPERIMENTS),
    Option("--distill-answers", "memory.recipe.distill_answers", dict(choices=ANSWER_SOURCES, help="distill: whose "
           "answer tokens the student learns: the teacher's greedy answer, or the query's rule-made answer"),
           EXPERIMENTS),
    Option("--seq-len", "memory.recipe.seq_len", dict(type=int_at_least(MIN_SEQ_LEN),
           help="tokens per training window"), TRAINING),
    Option("--rank", "memory.lora.rank", dict(type=positive_int, help="LoRA rank"), TRAINING),
    Option("--alpha", "memory.lora.alpha", dict(type=positive_float, default=None, help="LoRA alpha (default 2 x rank)"),
           TRAINING),
    Option("--dropout", "memory.lora.dropout", dict(type=float_in(0.0, 1.0, low_open=False, high_open=True),
           help="dropout on the LoRA branch"), TRAINING),
    Option("--use-rslora", "memory.lora.use_rslora", dict(action="store_true",
           help="scale by alpha/sqrt(r) instead of alpha/r"), TRAINING),
    Option("--epochs", "memory.train.epochs", dict(type=positive_int, help="passes over the training data"),
           TRAINING),
    Option("--lr", "memory.train.lr", dict(type=positive_float, help="peak learning rate (AdamW)"),
           TRAINING),
    Option("--batch-size", "memory.train.batch_size", dict(type=positive_int, help="windows per micro-batch"),
           TRAINING),
    Option("--grad-accum", "memory.train.grad_accum", dict(type=positive_int, help="micro-batches per optimizer "
           "step"), TRAINING),
    Option("--warmup-ratio", "memory.train.warmup_ratio", dict(type=float_in(0.0, 1.0, low_open=False,
           high_open=True), help="share of the steps spent warming up the learning rate"), TRAINING),
    Option("--seed", "memory.train.seed", dict(type=seed, help="adapter initialisation, data order and dropout"),
           TRAINING),
    Option("--grad-checkpointing", "memory.train.gradient_checkpointing", dict(action="store_true",
           help="recompute decoder layers in backward: less memory, ~1/3 more compute"), TRAINING, result=False),
    Option("--answer-mode", "memory.answer.mode", dict(choices=ANSWER_MODES, help="direct: answer the question; "
           "recite: the adapter first recites the turn the question is about, then the base model answers with "
           "it in context (needs a recipe with the recite part)"), EXPERIMENTS),
    Option("--max-new-tokens", "memory.answer.max_new_tokens", dict(type=positive_int,
           help="the longest answer, in tokens"), ANSWERING),
    Option("--answer-batch-size", "memory.answer.batch_size", dict(type=positive_int,
           help="questions decoded at once at most"), ANSWERING, result=False),
    Option("--answer-memory-mb", "memory.answer.memory_budget_mb", dict(type=positive_float, help="answering's keys, "
           "values and prefill activations stay within this many MiB (fewer rows at once, long prompts prefilled in "
           "passes; the same answers)"), ANSWERING, result=False),
    Option("--device", "device", dict(type=device_name, metavar="{cpu,cuda}", help="default: cuda if available"),
           ANSWERING, result=False),
    Option("--dtype", "dtype", dict(choices=DTYPES, help=DTYPE_DEFAULT_HELP),
           ANSWERING),
    Option("--threads", "threads", dict(type=threads, help="torch CPU threads (default: torch's, all cores); "
           "recorded, since CPU numerics depend on it"), ANSWERING),
)
OPTION_BY_DEST = {o.dest: o for o in OPTIONS}



def option_dests(*, under: tuple[str, ...] = ("",), field_prefix: str = "") -> tuple[str, ...]:
    """The dests of the result-changing options whose config path starts with one of ``under`` and whose field
    name starts with ``field_prefix``, in option order."""
    return tuple(o.dest for o in OPTIONS if o.result and o.path.startswith(under)
                 and o.path.rpartition(".")[2].startswith(field_prefix))


# Recorded only by newer runs; an older run_config.json that lacks them resumes without the check.
RECORDED_LATER = ("device_type", "threads", "data_sha256", "kernel_policy")
# Settings that change results: a resumed run must agree on all of them (the options, and what the run records).
RESULT_SETTINGS = option_dests() + tuple(k for k in RECORDED_LATER if k not in OPTION_BY_DEST)
# Settings newer than the first runs, with the value an older run_config.json implies.
SETTINGS_ADDED_LATER = {"train_format": "text", "context_tokens": None, "top_k": None, "rag_unit": None,
                        "adapters_from": None, "resolve_dates": False, "qa_per_turn": None,
                        "train_abstention": False, "abstention_ratio": None, "qa_source": "templates",
                        "abstention_style": "unmentioned", "queries_per_turn": None, "query_phrasings": None,
                        "distill_top_k": None, "distill_temperature": None, "distill_hard_weight": None,
                        "distill_answers": None, "answer_mode": "direct", "queries_from": "rules",
                        "kernel_policy": FIELDS_ADDED_LATER}
# What an adapter is trained with (the seed apart: every method records it, so it is never "not applicable").
TRAINING_SETTINGS = tuple(d for d in option_dests(under=("memory.lora.", "memory.train.", "memory.recipe."))
                          if d != "seed")
# The recipe settings of one part each: they apply only when the recipe has that part.
QUERY_SETTINGS = option_dests(under=("memory.recipe.",), field_prefix="quer")
DISTILL_SETTINGS = option_dests(under=("memory.recipe.",), field_prefix="distill_")
ABSTENTION_SETTINGS = option_dests(under=("memory.recipe.",), field_prefix="abstention_")
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
    ap = Parser(prog="python -m bench.locomo",
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
    groups = {name: ap.add_argument_group(name) for name in GROUPS}
    for o in OPTIONS:
        kwargs = {"default": config_value(defaults, o.path), **o.kwargs}  # an option may name its own default
        groups[o.group].add_argument(o.flag, dest=o.dest, **kwargs)
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
    if config.uses_rag:
        ap.require("bm25s", extra="rag", needed_for=f"--method {config.method}")
    if (config.adapters_from or config.shared_batches) and not config.uses_adapter:
        ap.error(f"--adapters-from and --shared-batches need an adapter method (lora, lora+rag, lora+fact-rag), not {config.method}")
    if config.memory.answer.mode == "recite" and (config.method != "lora" or config.shared_batches):
        ap.error("--answer-mode recite answers with the adapter's own recitation: method lora, no --shared-batches")
    recipe = config.memory.recipe
    parses = config.uses_adapter and not config.adapters_from and recipe.uses_queries and recipe.queries_from == "parser"
    if parses or config.uses_rag and config.retrieval_unit == "fact":
        try:
            check_parser_installed("--queries-from parser" if parses else f"--method {config.method}")
        except (MissingDependency, ParserError) as e:
            ap.error(str(e))
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
    if config.retrieval_unit == "fact":
        not_applicable += ("rag_unit",)
    if not config.memory.recipe.abstention:
        not_applicable += ABSTENTION_SETTINGS
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
    rag = f"{'fact-' if config.retrieval_unit == 'fact' else ''}RAG (BM25 top-{config.top_k} " \
          f"{config.retrieval_unit}s)" if config.uses_rag else ""
    if config.method == "base":
        return "Base (no context)"
    if config.method == "icl":
        return f"ICL (latest {config.context_tokens} tokens)"
    if config.method in ("rag", "fact-rag"):
        return rag
    r = config.memory.recipe
    extras = "".join([", timestamps" if r.timestamps and not r.resolve_dates else "",
                      ", timestamps+dates" if r.resolve_dates else "",
                      f", {r.train_format}" if r.train_format != "text" else "",
                      " by parser" if r.uses_queries and r.queries_from == "parser" else "",
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
    return f"{lora} + {rag}" if config.uses_rag else lora


class ContextTooLong(ValueError):
    pass


class SettingError(ValueError):
    """A setting that does not fit the model or the questions (found before the model loads)."""


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
        retriever = BM25Retriever(sample, config.retrieval_unit)
        hits = retriever.retrieve([q.question for q in questions], config.top_k)
        template = FACT_TEMPLATE if config.retrieval_unit == "fact" else RAG_TEMPLATE
        users, cut = [], []
        for h, a in zip(hits, asks):  # retrieved text longer than the window leaves is cut to fit
            room = (lm.config.max_position_embeddings - config.memory.answer.max_new_tokens - BOUNDARY_TOKENS
                    - len(chat_prompts(lm, [context_prompt(template, sample, "", a)])[0]))
            docs, tokens_cut = cut_to_fit([retriever.docs[i] for i in h], tok, room)
            users.append(context_prompt(template, sample, "\n".join(docs), a))
            cut.append(tokens_cut)
        info = {"retrieved": hits, "context_tokens_cut": cut, "documents": len(retriever.docs),
                "questions_with_context_cut": sum(1 for c in cut if c)}
    else:
        users = asks
    prompts = chat_prompts(lm, users)
    limit, new = lm.config.max_position_embeddings, config.memory.answer.max_new_tokens
    longest = max((len(p) for p in prompts), default=0)
    if longest + new > limit:  # check_questions_fit refuses such questions before the model loads
        raise ContextTooLong(f"{sample.sample_id}: a prompt of {longest} tokens + {new} new tokens exceeds the "
                             f"model's context of {limit} positions")
    return prompts, info


def gold_answer(qa) -> str:
    return qa.answer if qa.category != 5 else (qa.adversarial_answer or qa.answer or "")


def adapter_dir(out: Path, config: LocomoConfig, sample_id: str) -> Path:
    return run_adapter_dir(Path(config.adapters_from) if config.adapters_from else out, sample_id)


def prepare_adapter(sample: Sample, memory: Memory, config: LocomoConfig, out: Path, quiet: bool) -> dict:
    """Put this conversation's adapter into the model: trained here (and saved), taken from an earlier
    invocation of this run (resume), or from another run (--adapters-from). Returns result fields; a
    conversation whose training failed carries "error" and has no saved adapter (a resume retrains it)."""
    path = adapter_dir(out, config, sample.sample_id)
    if config.adapters_from:
        memory.load(path)
        return {"adapter": str(path)}
    train_file = conversation_dir(out, sample.sample_id) / "train.json"
    train = read_train(out, sample.sample_id)
    if train is not None and not train.get("error") and path.is_dir():  # trained by an earlier invocation
        memory.load(path)
    else:
        written = memory.write(conversation_only(sample), progress=not quiet)
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
    conv_dir = conversation_dir(out, sample.sample_id)
    per_question = {k: context.pop(k) for k in ("retrieved", "context_tokens_cut", "recitation") if k in context}
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
    atomic_write_json(conversation_dir(out, result["sample_id"]) / "result.json", result)
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

def collect(out: Path, samples: list[Sample]) -> tuple[list[dict], list[dict]]:
    results, rows = [], []
    for s in samples:
        result = read_result(out, s.sample_id)
        results.append(result)
        if not result["error"]:
            rows += read_predictions(out, s.sample_id, result["n_questions"])
    return results, rows


def summarise(out: Path, samples: list[Sample], lm: LoadedModel, config: LocomoConfig, settings: dict, wall: float,
              wall_before: float, info: dict) -> dict:
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
    wall_total = wall_before + wall
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
        "questions_with_context_cut": sum((r.get("context") or {}).get("questions_with_context_cut", 0)
                                          for r in conv_results) if config.uses_rag else None,
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
    if not str(source.get("method")).startswith("lora"):
        raise RunConfigMismatch(f"--adapters-from {config.adapters_from}: a {source.get('method')!r} run has no adapters")
    if source.get("model") != config.model:
        raise RunConfigMismatch(f"--adapters-from {config.adapters_from}: adapters of model {source.get('model')!r}, "
                                f"this run uses {config.model!r}")
    values = {}
    for k in TRAINING_SETTINGS + ("seed",):
        value = source[k] if k in source else SETTINGS_ADDED_LATER.get(k)  # added later: it was off there
        if value is not None or k not in ABSTENTION_SETTINGS + QUERY_SETTINGS + DISTILL_SETTINGS:
            # None: it did not apply there (the default stays)
            problem = setting_problem(k, value)
            if problem:
                raise RunFileError(f"{path}: field {k!r}: {problem}, got {value!r:.60}")
            values[k] = value
    try:
        return config_from(values | {"adapters_from": str(Path(config.adapters_from))}, config)
    except ValueError as e:
        raise RunFileError(f"{path}: its settings do not go together ({e})") from None


def setting_problem(dest: str, value) -> str | None:
    """Why ``value`` cannot be the setting ``dest`` of a run_config.json (what its option would refuse on the
    command line), or None."""
    option = OPTION_BY_DEST[dest]
    if option.kwargs.get("action") == "store_true":
        return None if isinstance(value, bool) else "must be true or false"
    if value is None:
        return None if config_value(LocomoConfig(), option.path) is None else "must be set"
    if "choices" in option.kwargs:
        return None if value in option.kwargs["choices"] else f"must be one of {', '.join(option.kwargs['choices'])}"
    parse = option.kwargs.get("type", str)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return f"must be {getattr(parse, '__name__', 'a string')}"
    try:
        return None if parse(str(value)) == value else f"must be {getattr(parse, '__name__', 'a string')}"
    except argparse.ArgumentTypeError as e:
        return str(e)


def fit_to_model(config: LocomoConfig, ckpt: Checkpoint, samples: list[Sample]) -> LocomoConfig:
    """The settings checked against the model's files (its window, layers, vocabulary) and the questions asked, the
    ICL budget filled in from the window: every refusal here comes before the weights load."""
    window, tok = ckpt.config.max_position_embeddings, ckpt.tokenizer
    recipe, lora = config.memory.recipe, config.memory.lora
    if config.uses_adapter and not config.adapters_from:
        check_seq_len(config, tok)
        if recipe.seq_len > window:
            raise SettingError(f"--seq-len {recipe.seq_len}: longer than the model's context window of {window} "
                               "positions")
        widths = [min(shape) for name, shape in linear_layers(ckpt.structure).items()
                  if is_target(name, lora.target_modules)]
        if widths and lora.rank > min(widths):
            raise SettingError(f"--rank {lora.rank}: more than the narrowest adapted layer's {min(widths)} features "
                               "(a LoRA update's rank cannot exceed it)")
        if "distill" in recipe.parts and recipe.distill_top_k > ckpt.config.vocab_size:
            raise SettingError(f"--distill-top-k {recipe.distill_top_k}: more than the model's "
                               f"{ckpt.config.vocab_size} tokens")
    if config.method == "icl" and config.context_tokens is None:
        if window <= ICL_RESERVE_TOKENS:
            raise SettingError(f"the model's context window ({window} positions) leaves no room for ICL's default "
                               "budget: set --context-tokens")
        config = dataclasses.replace(config, context_tokens=window - ICL_RESERVE_TOKENS)
    check_questions_fit(samples, config, tok, window)
    return config


def check_questions_fit(samples: list[Sample], config: LocomoConfig, tok: Tokenizer, window: int) -> None:
    """Each question's prompt, with the room its method takes (ICL's conversation, a recitation) and its answer,
    fits the model's context window. Retrieved text is cut to fit instead (question_prompts)."""
    new, template = config.memory.answer.max_new_tokens, config.memory.answer.question_template
    recite = config.memory.answer.mode == "recite"
    for s in samples:
        for qa in select_questions(s, config.with_adversarial, config.max_questions):
            ask = template.format(question=qa.question)
            text, room, what = ask, 0, ""
            if config.method == "icl":
                text, room, what = (context_prompt(CONTEXT_TEMPLATE, s, "", ask), config.context_tokens,
                                    f" + {config.context_tokens} of conversation (--context-tokens)")
            elif config.uses_rag:
                text = context_prompt(RAG_TEMPLATE, s, "", ask)
            elif recite:
                text, room, what = (RECITED_CONTEXT.format(recitation="") + ask, RECITE_MAX_NEW_TOKENS,
                                    f" + {RECITE_MAX_NEW_TOKENS} of recitation")
            prompt = len(tok.encode_chat([{"role": "user", "content": text}]))
            if prompt + room + new > window:
                raise SettingError(f"sample {s.sample_id!r}: the question {qa.question!r:.60} makes a prompt of "
                                   f"{prompt} tokens{what} + {new} new tokens (--max-new-tokens): more than the "
                                   f"model's context window of {window} positions")
            if recite and len(tok.encode_chat([{"role": "user", "content": RECITE_TEMPLATE.format(
                    question=qa.question)}])) + RECITE_MAX_NEW_TOKENS > window:
                raise SettingError(f"sample {s.sample_id!r}: the question {qa.question!r:.60} is too long to recite "
                                   f"within the model's context window of {window} positions")


def check_seq_len(config: LocomoConfig, tok: Tokenizer) -> None:
    """A chat-QA window holds the system turn and at least one short exchange; say so before any work."""
    recipe = config.memory.recipe
    if not recipe.uses_chat:
        return
    system = tok.default_system_prompt
    head = len(tok.encode(tok.format_chat([{"role": "system", "content": system}], add_generation_prompt=False))
               if system is not None else "")
    exchange = len(tok.encode("<|im_start|>user\n" + config.memory.answer.question_template.format(question="Who?")
                              + "<|im_end|>\n<|im_start|>assistant\nYes<|im_end|>\n"))
    if head + exchange > recipe.seq_len:
        raise SettingError(f"--seq-len {recipe.seq_len} is too small for one chat window of this model ({head} "
                           f"tokens of system turn + {exchange} of the shortest exchange): use at least "
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


@dataclass
class Plan:
    """A run whose every input was checked: nothing has been loaded or written yet."""

    config: LocomoConfig
    samples: list[Sample]
    out: Path
    settings: dict  # what run_config.json records
    device: torch.device
    found: OutState  # what earlier invocations left in out


def plan_run(args: argparse.Namespace, config: LocomoConfig, dist: Dist) -> Plan:
    """Everything that can be refused, checked before the weights load and before --out is written: the data, the
    model's files, the settings against both, the resume, every path to be written and every file to be read."""
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
    ckpt = inspect_checkpoint(config.model, config.kernels)
    config = fit_to_model(config, ckpt, samples)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = settings_of(config) | {
        "data": str(data_path), "data_sha256": file_sha256(data_path), "device_type": device.type,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "kernel_policy": config.kernels.to_dict(), "conversations": [s.sample_id for s in samples],
    }
    check_or_write_run_config(out, settings, RESULT_SETTINGS, SETTINGS_ADDED_LATER, RECORDED_LATER, write=False)
    layers = linear_layers(ckpt.structure)
    found = inspect_out(out, [s.sample_id for s in samples], config.uses_adapter and not config.adapters_from, layers)
    if config.adapters_from:  # the adapters this run will load, each read and fitted to the model
        missing = [s.sample_id for s in samples if not adapter_dir(out, config, s.sample_id).is_dir()]
        if missing:
            raise RunConfigMismatch(f"--adapters-from {config.adapters_from}: no adapter for {', '.join(missing)}")
        for s in samples:
            if found.states[s.sample_id] != "finished":
                read_adapter(adapter_dir(out, config, s.sample_id), layers)
    return Plan(config, samples, out, settings, device, found)


def run(args: argparse.Namespace, config: LocomoConfig, dist: Dist, t_start: float) -> dict | None:
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    plan = plan_run(args, config, dist)
    config, out = plan.config, plan.out
    lm = load_model(config.model, device=plan.device, dtype=config.dtype, progress=not args.quiet,
                    policy=config.kernels)
    try:  # from here on --out is written: an interruption keeps what finished
        return run_conversations(args, plan, lm, dist, t_start)
    except KeyboardInterrupt as e:
        raise Interrupted(out) from e


def run_conversations(args: argparse.Namespace, plan: Plan, lm: LoadedModel, dist: Dist, t_start: float) -> dict | None:
    config, samples, out, states = plan.config, plan.samples, plan.out, plan.found.states
    if dist.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        check_or_write_run_config(out, plan.settings, RESULT_SETTINGS, SETTINGS_ADDED_LATER, RECORDED_LATER)
    dist.barrier()
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
    if config.shared_batches:
        done = run_shared_batches(todo, lm, memory, config, out, args.quiet)
    else:
        done = (run_conversation(s, lm, memory, config, out, args.quiet) for s in todo)
    for r in done:
        status = f"FAILED: {r['error']}" if r["error"] else f"avg F1 {r['f1']['avg_f1'] or 0:.2f}"
        cut = (r.get("context") or {}).get("questions_with_context_cut")
        if cut:
            status += f" ({cut} retrieved contexts cut to fit the context window)"
        print(f"[{r['sample_id']}] {r['n_questions']} questions, {status}", file=sys.stderr)

    dist.barrier()
    if dist.rank != 0:
        return None
    info["world_size"] = dist.world_size
    results = summarise(out, samples, lm, config, plan.settings, time.perf_counter() - t_start,
                        plan.found.wall_seconds, info)
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
    except (LocomoDataError, ConfigError, CheckpointError, TokenizerError, PackagedModelError, AdapterError,
            RunConfigMismatch, RunFileError, SettingError, ContextTooLong, UnsafeNameError, UnsafePathError) as e:
        fail(str(e))
    except Interrupted as e:
        fail(f"interrupted: finished conversations are kept in {e.out}; rerun with --out {e.out} (and the same "
             "settings) to resume", 130)
    except KeyboardInterrupt:
        fail("interrupted before the run started: nothing was written to the run directory", 130)
    if results is not None and results["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    cli()
