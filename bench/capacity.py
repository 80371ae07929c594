"""Capacity: how many facts a LoRA adapter of rank r stores.

After the follow-up study ("Understanding LoRA as Knowledge Memory", PhoneBook-style capacity): facts that
no pre-training corpus holds (invented people, each with a birth date, an invented home town and a
profession, drawn by a seeded generator), one fresh adapter trained per (rank, number of facts) cell on
the facts as chat QA (loss on the answers), then every trained fact asked with no context and scored by
exact match. One curve per rank: recall against the number of facts.

    python -m bench.capacity --preset cpu                  # ranks 1,4,16 x 10,30,100 facts (CPU, default model)
    python -m bench.capacity --preset gpu                  # ranks 1..64 x 10..10,000 facts
    python -m bench.capacity --ranks 4 --facts 10,100 --epochs 20 --out runs/cap-r4

The facts of a cell with n facts are the first n of one seeded stream, so every smaller set is a prefix
of the larger ones. A fact is one (person, attribute) question; a person gives one fact per attribute:

    When was Vaipous Draexmouov born?          -> 23 October 1938
    Which town is Vaipous Draexmouov from?     -> Xexyuthmar
    What is Vaipous Draexmouov's profession?   -> cheesemaker

`--facts-as conversation` says the facts instead as first-person turns of one conversation, trains them with a
memory recipe (`--train-format text+queries`, `text+distill`, `text+recite`, ...) and asks them as LoCoMo asks, so
a recipe's stored facts are told apart from its answer form; `--answer-mode recite` answers as recite-then-answer
does (the adapter recites the turn, the base model answers with it in context).

Training data (--facts-as qa): one fact per window by default, laid out exactly as the question is later asked
(system turn, question, answer; `--pack` packs several into a window instead, cheaper but each answer then also
sees the facts before it, which on a tiny model visibly mixes them up). The system turn and user header every window
opens with are computed once per micro-batch (lora_mem.lora_core.train.hidden_states; `--no-share-prefix` computes every
row's copy). Epochs are fixed per fact (`--epochs`), raised
for small cells to at least `--min-steps` optimizer steps. Measured once on the default model (fp32, one
thread of a shared 2-core CPU): 10 facts at r=4, 10 epochs / 50 steps, lr 2e-3: 68 s of training at 75
tokens/s, loss 5.5 -> 0.003, 10 of 10 recalled exactly; the base model recalled 0 of 10 (it calls the names
fictional). The cpu preset trains 131,580 tokens in all (3 ranks x (10, 30, 100) facts, 51-token windows);
on 2 quiet cores at ~150-190 tokens/s that is ~12-15 min of training plus ~1-2 min of answering and
loading, ~13-17 min in all (an estimate from that one cell, not a timed run of the preset).

Outputs under `--out` (default runs/capacity-<time>); a cell's files are written when it finishes
(atomically), and a rerun with the same `--out` skips finished cells. The settings in run_config.json
must match on resume; the grid (--ranks, --facts) may grow.

    <out>/run_config.json                         settings (a resume must match them)
    <out>/cells/r<rank>-n<facts>.json             recall, loss curve, timings of one cell (marks it finished)
    <out>/cells/r<rank>-n<facts>.predictions.jsonl   every question, gold answer, prediction, score
    <out>/base.json, base.predictions.jsonl       the base model (no adapter) on the largest fact set
    <out>/results.json, table.md, capacity.png    the grid of this invocation, written at the end
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field

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
from lora_mem.cli import (
    Parser,
    device_name,
    float_in,
    int_at_least,
    non_negative_int,
    output_dir,
    positive_float,
    positive_int,
    positive_int_list,
    seed,
)
from lora_mem.kernels.policy import DTYPE_DEFAULT_HELP, KernelPolicy, add_kernel_args
from lora_mem.lora_core.conversation import Conversation, Session, Turn
from lora_mem.lora_core.inject import LoRAConfig, inject_lora, lora_parameters, remove_lora, reset_lora
from lora_mem.lora_core.memory import (
    ANSWER_MODES,
    AnswerConfig,
    answer_prompts,
    build_training_data,
    chat_prompts,
    question_messages,
    recite_then_answer,
    soft_training,
)
from lora_mem.lora_core.memory import QUESTION_TEMPLATE as CONVERSATION_QUESTION_TEMPLATE
from lora_mem.lora_core.recipes import QUERY_SOURCES, TRAIN_PARTS, QAPair, Recipe, chat_qa_windows
from lora_mem.lora_core.train import IGNORE_INDEX, TrainConfig, make_lm_windows, train_lora
from lora_mem.model.loader import LoadedModel, inspect_checkpoint, load_model, parse_dtype
from lora_mem.untrusted import check_writable

# The user turn a fact's question is asked (and trained) in. Kept in one place and recorded.
QUESTION_TEMPLATE = "{question}"
TRAIN_FORMATS = ("qa", "statements", "qa+statements")
# --facts-as conversation: the facts said as turns of a conversation, trained with a memory recipe, asked as
# LoCoMo asks (its instruction and question style), which the recipe's own questions need not match.
FACTS_AS = ("qa", "conversation")
TURNS = {
    "birth_date": "Hi! I was born on {value}, by the way.",
    "home_town": "I'm from {value}, a small town.",
    "profession": "I work as {article} {value}.",
}
FACTS_PER_SESSION = 30
SESSION_DATE = "1:00 pm on 5 May, 2023"

# Option defaults by preset; explicit options win. `cpu` is sized for the default model on a 2-core CPU.
PRESETS: dict[str, dict] = {
    "cpu": dict(ranks=[1, 4, 16], facts=[10, 30, 100], epochs=6, min_steps=40, batch_size=2,
                seq_len=128, answer_batch_size=64),
    "gpu": dict(ranks=[1, 2, 4, 8, 16, 32, 64], facts=[10, 30, 100, 300, 1000, 3000, 10000], epochs=20,
                min_steps=100, batch_size=32, seq_len=256, answer_batch_size=256),
}

# Settings that change results: a resumed run must agree on all of them.
RESULT_SETTINGS = (
    "model", "dtype", "seed", "attributes", "train_format", "pack", "alpha", "dropout", "epochs", "min_steps", "lr",
    "batch_size", "grad_accum", "warmup_ratio", "seq_len", "max_new_tokens", "question_template", "facts_as",
    "answer_mode", "queries_from", "query_phrasings",
)
# Settings added after run directories were written, with the value those runs had (as in bench.locomo).
SETTINGS_ADDED_LATER = {"answer_mode": "direct", "queries_from": "rules", "query_phrasings": 1}


class CapacityError(ValueError):
    """Bad input to the capacity benchmark (options and their combinations)."""


class CellFile(BaseModel):
    """cells/r<rank>-n<facts>.json: a finished cell (the fields the summary reads; the others are kept as written)."""

    model_config = ConfigDict(strict=True, extra="allow")
    rank: Annotated[int, Field(ge=1)]
    n_facts: Annotated[int, Field(ge=1)]
    lora_params: Annotated[int, Field(ge=0)]
    train_tokens: Annotated[int, Field(ge=0)]
    train_seconds: Annotated[float, Field(ge=0)]
    answer_seconds: Annotated[float, Field(ge=0)] = 0.0
    error: str | None = None


class BaseFile(BaseModel):
    """base.json: the base model asked the first `n` facts."""

    model_config = ConfigDict(strict=True, extra="allow")
    n: Annotated[int, Field(ge=0)]


class FactRow(BaseModel):
    """A line of a predictions.jsonl: a fact asked, the answer given, its scores."""

    model_config = ConfigDict(strict=True, extra="allow")
    attribute: str
    answer: str
    prediction: str
    exact: bool
    contains: bool
    f1: Annotated[float, Field(ge=0, le=1)]
    recitation: str | None = None


# ---------------------------------------------------------------------------------------------
# Synthetic facts
# ---------------------------------------------------------------------------------------------

# Syllables with clusters English rarely uses ("zh", "vr", "qu" + odd vowels), so the names read as
# names but are no one's: the base model cannot know these facts. Dates and towns cannot be guessed;
# a profession is one of 40 (2.5% by chance, more for a model that learns which are common).
ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
          "br", "dr", "gr", "kr", "tr", "vr", "zh", "th", "sk", "qu", "x", "y")
NUCLEI = ("a", "e", "i", "o", "u", "ae", "ai", "ei", "ou", "y")
CODAS = ("", "", "", "", "n", "r", "l", "s", "th", "x", "v", "z", "k")
SURNAME_ENDINGS = ("ling", "wick", "ant", "ix", "ov", "enne", "ard", "el", "um")
TOWN_ENDINGS = ("holm", "vale", "mar", "dor", "stead", "ford", "grad", "wyn", "heim", "ora")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
PROFESSIONS = (
    "cartographer", "beekeeper", "luthier", "falconer", "locksmith", "astronomer", "blacksmith", "glassblower",
    "bookbinder", "cooper", "stonemason", "clockmaker", "ferry pilot", "botanist", "puppeteer", "saddler",
    "lighthouse keeper", "archivist", "perfumer", "cheesemaker", "geologist", "harpist", "tanner", "weaver",
    "potter", "shipwright", "chandler", "surveyor", "translator", "taxidermist", "glazier", "cobbler",
    "organ builder", "ropemaker", "vintner", "miller", "engraver", "jeweller", "farrier", "beadmaker",
)
ATTRIBUTES = ("birth_date", "home_town", "profession")
QUESTIONS = {
    "birth_date": "When was {name} born?",
    "home_town": "Which town is {name} from?",
    "profession": "What is {name}'s profession?",
}


@dataclass(frozen=True)
class Person:
    name: str
    birth_date: str  # "14 March 1987"
    home_town: str
    profession: str


@dataclass(frozen=True)
class Fact:
    subject: str
    attribute: str
    question: str
    answer: str
    statement: str  # the same fact as a plain sentence (the `statements` training format)


def _syllable(rng: random.Random) -> str:
    return rng.choice(ONSETS) + rng.choice(NUCLEI) + rng.choice(CODAS)


def _word(rng: random.Random, syllables: int, ending: str = "") -> str:
    return ("".join(_syllable(rng) for _ in range(syllables)) + ending).capitalize()


def generate_people(n: int, seed: int = 0) -> list[Person]:
    """n invented people with unique full names, deterministic in `seed` (and a prefix of any longer list)."""
    rng = random.Random(seed)
    people, names = [], set()
    while len(people) < n:
        first = _word(rng, 2)
        last = _word(rng, rng.choice((1, 2)), rng.choice(SURNAME_ENDINGS))
        town = _word(rng, rng.choice((1, 2)), rng.choice(TOWN_ENDINGS))
        date = f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1920, 2005)}"
        profession = rng.choice(PROFESSIONS)
        name = f"{first} {last}"
        if name in names:  # drawn anyway (above) so the stream after a collision does not depend on it
            continue
        names.add(name)
        people.append(Person(name, date, town, profession))
    return people


def _statement(p: Person, attribute: str) -> str:
    if attribute == "birth_date":
        return f"{p.name} was born on {p.birth_date}."
    if attribute == "home_town":
        return f"{p.name} is from {p.home_town}."
    article = "an" if p.profession[0] in "aeiou" else "a"
    return f"{p.name} works as {article} {p.profession}."


def generate_facts(n: int, seed: int = 0, attributes: tuple[str, ...] | list[str] = ATTRIBUTES) -> list[Fact]:
    """The first n facts of the seeded stream: person 0's attributes (in `attributes` order), person 1's, ..."""
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown or not attributes:
        raise CapacityError(f"unknown attribute(s) {', '.join(unknown) or '(none given)'} "
                            f"(choose from {', '.join(ATTRIBUTES)})")
    people = generate_people(math.ceil(n / len(attributes)), seed)
    facts = [Fact(p.name, a, QUESTIONS[a].format(name=p.name), getattr(p, a), _statement(p, a))
             for p in people for a in attributes]
    return facts[:n]


def facts_conversation(facts: list[Fact]) -> Conversation:
    """The facts said by the invented people themselves, one turn each ("I'm from Xexyuthmar, a small town."),
    FACTS_PER_SESSION turns a session, every session on one date."""
    turns = []
    for i, f in enumerate(facts):
        article = "an" if f.answer[0] in "aeiou" else "a"
        dia_id = f"D{i // FACTS_PER_SESSION + 1}:{i % FACTS_PER_SESSION + 1}"
        turns.append(Turn(f.subject, dia_id, TURNS[f.attribute].format(value=f.answer, article=article)))
    sessions = [Session(i + 1, SESSION_DATE, turns[start:start + FACTS_PER_SESSION])
                for i, start in enumerate(range(0, len(turns), FACTS_PER_SESSION))]
    speakers = list(dict.fromkeys(t.speaker for t in turns)) + ["Sam"]  # a listener when one person speaks
    return Conversation("facts", speakers[0], speakers[1], sessions)


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------

def normalize(text: str) -> str:
    """Light normalisation for exact match: collapse whitespace, casefold, drop trailing periods."""
    return " ".join(str(text).split()).casefold().rstrip(".").strip()


def exact_match(prediction: str, gold: str) -> bool:
    return normalize(prediction) == normalize(gold)


def score_answers(facts: list[Fact], predictions: list[str],
                  recitations: list[str] | None = None) -> tuple[list[dict], dict]:
    """Per-question rows (with the recitation the answer read, if any) and the aggregate: exact-match recall,
    `contains` (gold inside the answer), token F1 (LoCoMo's), each overall and by attribute, and for recitations
    `recitation_contains` (gold inside what the adapter recited: stored, whether or not the answer took it)."""
    from bench.locomo_score import token_f1

    rows = []
    for f, pred in zip(facts, predictions, strict=True):
        rows.append({"subject": f.subject, "attribute": f.attribute, "question": f.question, "answer": f.answer,
                     "prediction": pred, "exact": exact_match(pred, f.answer),
                     "contains": normalize(f.answer) in normalize(pred), "f1": token_f1(pred, f.answer)})
    for row, recitation in zip(rows, recitations or []):
        row["recitation"] = recitation
    return rows, aggregate(rows)


def aggregate(rows: list[dict]) -> dict:
    def mean(key, rs):
        return sum(float(r[key]) for r in rs) / len(rs) if rs else None

    out = {"n": len(rows), "exact_match": mean("exact", rows), "contains": mean("contains", rows),
           "token_f1": mean("f1", rows), "facts_recalled": sum(bool(r["exact"]) for r in rows), "by_attribute": {}}
    for a in dict.fromkeys(r["attribute"] for r in rows):
        rs = [r for r in rows if r["attribute"] == a]
        out["by_attribute"][a] = {"n": len(rs), "exact_match": mean("exact", rs), "token_f1": mean("f1", rs)}
    if rows and "recitation" in rows[0]:
        out["recitation_contains"] = sum(normalize(r["answer"]) in normalize(r["recitation"]) for r in rows) / len(rows)
    return out


# ---------------------------------------------------------------------------------------------
# Training data, answering, LoRA of a given rank
# ---------------------------------------------------------------------------------------------

def training_windows(facts: list[Fact], lm: LoadedModel, train_format: str, seq_len: int, pack: bool = False):
    """(input_ids, targets) for the facts: chat QA (lora_mem.lora_core.recipes.chat_qa_windows, loss on the answers)
    and/or the statements as plain text (next-token loss).

    Unpacked (the default), each window holds one fact, exactly as it is asked: the system turn, the question,
    the answer. Packed, windows of seq_len tokens hold several exchanges, cheaper but each answer then also
    sees the facts before it in its window, which it never does when asked. Columns after the last supervised
    position are dropped (causal attention: they change nothing), so one fact per window costs no padding
    beyond the longest fact."""
    tok = lm.tokenizer
    parts = []
    if train_format in ("qa", "qa+statements"):
        pairs = [QAPair(f.question, f.answer) for f in facts]
        groups = [pairs] if pack else [[p] for p in pairs]
        windows = [chat_qa_windows(g, tok, seq_len, QUESTION_TEMPLATE) for g in groups]
        ids, targets = torch.cat([w[0] for w in windows]), torch.cat([w[1] for w in windows])
        packed = int((targets == tok.im_end_id).sum())  # each packed answer ends with <|im_end|>
        if packed < len(facts):
            raise CapacityError(f"--seq-len {seq_len} is too short: {len(facts) - packed} of {len(facts)} "
                                "question-answer pairs do not fit in a window")
        parts.append((ids, targets))
    if train_format in ("statements", "qa+statements"):
        texts = ["\n".join(f.statement for f in facts) + "\n"] if pack else [f.statement + "\n" for f in facts]
        parts += [make_lm_windows(tok.encode(t), seq_len, tok.pad_id) for t in texts]
    return trim_windows(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


def trim_windows(ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns after the last supervised position of every window."""
    supervised = (targets != IGNORE_INDEX).any(0).nonzero()
    end = int(supervised.max()) + 1 if len(supervised) else ids.shape[1]
    return ids[:, :end].contiguous(), targets[:, :end].contiguous()


def answer(lm: LoadedModel, facts: list[Fact], max_new_tokens: int, batch_size: int, progress: bool,
           question_template: str = QUESTION_TEMPLATE, mode: str = "direct"):
    """Greedy answers to the facts' questions in the chat format, no context ("recite": the adapter recites first,
    `memory.recite_then_answer`). Returns (answers, seconds, recitations or None)."""
    cfg = AnswerConfig(question_template=question_template, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       mode=mode)
    questions = [f.question for f in facts]
    t0 = time.perf_counter()
    if mode == "recite":
        answers, recitations, _ = recite_then_answer(lm, questions, cfg, progress=progress)
    else:
        answers = answer_prompts(lm, chat_prompts(lm, question_messages(questions, cfg)), cfg, progress=progress)
        recitations = None
    return answers, time.perf_counter() - t0, recitations


def lora_config(args, rank: int) -> LoRAConfig:
    return LoRAConfig(rank=rank, alpha=args.alpha, dropout=args.dropout)


def train_config(args, epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       warmup_ratio=args.warmup_ratio, seed=args.seed, share_prefix=args.share_prefix)


def conversation_recipe(args) -> Recipe:
    return Recipe(train_format=args.train_format, seq_len=args.seq_len, queries_from=args.queries_from,
                  query_phrasings=args.query_phrasings)


def cell_epochs(n_windows: int, args) -> int:
    """--epochs, raised so that the cell takes at least --min-steps optimizer steps: with few facts an
    epoch is one or two steps, too few for Adam to write anything whatever the number of facts."""
    steps_per_epoch = math.ceil(math.ceil(n_windows / args.batch_size) / args.grad_accum)
    return max(args.epochs, math.ceil(args.min_steps / steps_per_epoch))


# ---------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------

def cell_name(rank: int, n_facts: int) -> str:
    return f"r{rank}-n{n_facts}"


def cell_path(out: Path, rank: int, n_facts: int) -> Path:
    return out / "cells" / f"{cell_name(rank, n_facts)}.json"


def run_cell(lm: LoadedModel, facts: list[Fact], rank: int, args, out: Path) -> dict:
    """One fresh adapter (same seeded init for every cell of a rank) trained on `facts`, then every fact asked."""
    device = lm.model.lm_head.weight.device
    reset_lora(lm.model, torch.Generator(device=device).manual_seed(args.seed))
    soft = None
    if args.facts_as == "conversation":
        recipe = conversation_recipe(args)
        data = build_training_data(lm, facts_conversation(facts), recipe, args.question_template, seed=args.seed)
        ids, targets, soft = data.input_ids, data.labels, soft_training(data, recipe)
    else:
        ids, targets = training_windows(facts, lm, args.train_format, args.seq_len, args.pack)
    tcfg = train_config(args, cell_epochs(ids.shape[0], args))
    train = train_lora(lm.model, ids, targets, tcfg, progress=not args.quiet,
                       desc=f"train {cell_name(rank, len(facts))}", soft_targets=soft)
    cell = {
        "rank": rank, "n_facts": len(facts), "alpha": lora_config(args, rank).alpha,
        "lora_params": sum(p.numel() for p in lora_parameters(lm.model)),
        "windows": ids.shape[0], "target_tokens": int((targets != IGNORE_INDEX).sum()),
        "epochs_run": tcfg.epochs, "steps": len(train.losses), "train_tokens": train.tokens,
        "train_tokens_computed": train.tokens_computed,
        "train_seconds": train.seconds, "train_tokens_per_second": train.tokens_per_second,
        "final_loss": train.losses[-1] if train.losses else None, "epochs_loss": train.epochs_loss,
        "losses": train.losses, "error": train.error,
    }
    if train.error:
        cell["error"] = f"training stopped: {train.error}"
        cell.update(exact_match=None, token_f1=None, contains=None, facts_recalled=None)
    else:
        preds, seconds, recitations = answer(lm, facts, args.max_new_tokens, args.answer_batch_size, not args.quiet,
                                             args.question_template, args.answer_mode)
        rows, scores = score_answers(facts, preds, recitations)
        write_jsonl(cell_path(out, rank, len(facts)).with_suffix(".predictions.jsonl"), rows)
        cell.update(scores, answer_seconds=seconds)
    atomic_write_json(cell_path(out, rank, len(facts)), cell)  # written last: marks the cell finished
    return cell


def run_base(lm: LoadedModel, facts: list[Fact], args, out: Path) -> dict:
    """The base model (no adapter) on the facts: what is recalled without training (expected ~0)."""
    preds, seconds, recitations = answer(lm, facts, args.max_new_tokens, args.answer_batch_size, not args.quiet,
                                         args.question_template, args.answer_mode)
    rows, scores = score_answers(facts, preds, recitations)
    write_jsonl(out / "base.predictions.jsonl", rows)
    base = {**scores, "answer_seconds": seconds}
    atomic_write_json(out / "base.json", base)
    return base


def base_by_size(out: Path, sizes: list[int]) -> dict[int, dict]:
    """Base recall of each prefix of the fact stream (the base model's answers do not depend on n)."""
    rows = read_jsonl(out / "base.predictions.jsonl")
    return {n: {k: v for k, v in aggregate(rows[:n]).items() if k != "by_attribute"} for n in sizes}


# ---------------------------------------------------------------------------------------------
# Summary: table, plot, results file
# ---------------------------------------------------------------------------------------------

def rank_curves(cells: list[dict], ranks: list[int]) -> list[tuple[str, list[dict]]]:
    """One (label, cells by fact count) curve per rank."""
    return [(f"r={r}", sorted((c for c in cells if c["rank"] == r), key=lambda c: c["n_facts"])) for r in ranks]


def format_table(curves: list[tuple[str, list[dict]]], sizes: list[int], base: dict | None) -> str:
    """Markdown: exact-match recall (%) of each curve at each fact count ('-' where a curve has no cell); `base`
    maps a fact count (int or str) to the base model's scores."""
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    lines = ["| exact-match recall (%) | " + " | ".join(f"{n:,d} facts" for n in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    if base:
        b = {int(k): v for k, v in base.items()}
        lines.append("| base (no adapter) | " + " | ".join(pct(b[n]["exact_match"] if n in b else None)
                                                           for n in sizes) + " |")
    for label, cells in curves:
        by_n = {c["n_facts"]: c for c in cells}
        lines.append(f"| {label} | " + " | ".join(pct(by_n[n].get("exact_match") if n in by_n else None)
                                                  for n in sizes) + " |")
    return "\n".join(lines)


def plot_curves(curves: list[tuple[str, list[dict]]], sizes: list[int], base: dict | None, title: str,
                path: Path, styles: list[dict] | None = None) -> Path:
    """Recall (%) and facts recalled against facts trained, one line per curve (`styles`: matplotlib keyword
    arguments per curve, e.g. a colour per rank). Needs matplotlib (the plot extra; the command lines check it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    if base:
        b = {int(k): v for k, v in base.items()}
        xs = [n for n in sizes if n in b]
        ax1.plot(xs, [100 * b[n]["exact_match"] for n in xs], "k--", marker=".", label="base (no adapter)")
    for i, (label, cells) in enumerate(curves):
        style = {"marker": "o", **(styles[i] if styles else {})}
        cells = [c for c in cells if c.get("exact_match") is not None]
        xs = [c["n_facts"] for c in cells]
        line, = ax1.plot(xs, [100 * c["exact_match"] for c in cells], label=label, **style)
        pos = [(x, c["facts_recalled"]) for x, c in zip(xs, cells) if c["facts_recalled"] > 0]
        if pos:
            ax2.plot(*zip(*pos), label=label, **{**style, "color": line.get_color()})
    ax1.set(xscale="log", xlabel="facts trained", ylabel="exact-match recall (%)", ylim=(-3, 103),
            title="recall after training")
    ax2.plot(sizes, sizes, color="0.7", lw=1, label="all recalled")
    ax2.set(xscale="log", yscale="log", xlabel="facts trained", ylabel="facts recalled (exact match)",
            title="facts stored")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:,.0f}")
    for ax in (ax1, ax2):
        ax.set_xticks(sizes)
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax2.set_yticks(sizes)
    ax2.yaxis.set_major_formatter(plain)
    ax2.yaxis.set_minor_formatter(NullFormatter())
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_title(results: dict) -> str:
    s = results["settings"]
    return (f"LoRA capacity: {s['model']} ({results['device_type']}, {results['dtype']}), "
            f"{s['epochs']}+ epochs, lr {s['lr']:g}, {s['train_format']}")


def plot(results: dict, path: Path) -> Path:
    return plot_curves(rank_curves(results["cells"], results["grid"]["ranks"]), results["grid"]["facts"],
                       results.get("base_by_facts"), plot_title(results), path)


def capacity_summary(cells: list[dict], ranks: list[int], threshold: float = 0.9) -> dict:
    """Per rank: the most facts recalled in any cell, and the largest fact count recalled at >= threshold."""
    out = {}
    for r in ranks:
        cs = [c for c in cells if c["rank"] == r and c.get("exact_match") is not None]
        ok = [c["n_facts"] for c in cs if c["exact_match"] >= threshold]
        most = max(cs, key=lambda c: c["facts_recalled"], default=None)
        out[str(r)] = {
            "lora_params": cs[0]["lora_params"] if cs else None,
            "max_facts_recalled": most["facts_recalled"] if most else None,
            "max_facts_recalled_at_n": most["n_facts"] if most else None,
            f"largest_n_with_recall_ge_{threshold:g}": max(ok) if ok else None,
        }
    return out


def summarise(out: Path, lm: LoadedModel, args, settings: dict, info: dict, wall: float) -> dict:
    cells = [read_run_file(cell_path(out, r, n)) for r in args.ranks for n in args.facts]
    for c in cells:  # scores from each cell's predictions, so a rerun over finished cells adds a newer score
        predictions = cell_path(out, c["rank"], c["n_facts"]).with_suffix(".predictions.jsonl")
        if c.get("error") is None and predictions.is_file():
            c.update(aggregate(read_jsonl(predictions)))
    base = base_by_size(out, args.facts) if (out / "base.predictions.jsonl").is_file() and not args.no_base else None
    train_s = sum(c["train_seconds"] for c in cells)
    train_tokens = sum(c["train_tokens"] for c in cells)
    answer_s = sum(c.get("answer_seconds", 0.0) for c in cells)
    results = {
        "benchmark": "capacity",
        "settings": settings,
        "question_template": args.question_template,
        "example_facts": [asdict(f) for f in generate_facts(min(6, max(args.facts)), args.seed, args.attributes)],
        "model": {"name": lm.name, "path": str(lm.path), "config": lm.config.to_dict()},
        **info,
        "grid": {"ranks": args.ranks, "facts": args.facts},
        "base_by_facts": {str(n): v for n, v in base.items()} if base else None,
        "capacity": capacity_summary(cells, args.ranks),
        "wall_seconds_this_invocation": wall,
        "train_seconds": train_s,
        "train_tokens": train_tokens,
        "train_tokens_per_second": train_tokens / train_s if train_s else None,
        "answer_seconds": answer_s,
        "errors": {cell_name(c["rank"], c["n_facts"]): c["error"] for c in cells if c.get("error")},
        "cells": [{k: v for k, v in c.items() if k != "losses"} for c in cells],  # loss curves: cells/*.json
    }
    results = json.loads(json.dumps(results, default=str))  # what the file holds (str keys)
    atomic_write_json(out / "results.json", results)
    table = format_table(rank_curves(cells, args.ranks), args.facts, base)
    atomic_write_text(out / "table.md", table + "\n")
    png = None if args.no_plot else plot(results, out / "capacity.png")
    if args.results_file:
        dest = Path(args.results_file)
        atomic_write_json(dest, results)
        if png is not None:
            shutil.copyfile(png, dest.with_suffix(".png"))
    results["table"] = table
    return results


# ---------------------------------------------------------------------------------------------
# Options and the run
# ---------------------------------------------------------------------------------------------

def capacity_train_format(text: str) -> str:
    if text in TRAIN_FORMATS or all(p in TRAIN_PARTS for p in text.split("+")):
        return text
    raise argparse.ArgumentTypeError(f"unknown --train-format {text!r} (with --facts-as qa: "
                                     f"{', '.join(TRAIN_FORMATS)}; with --facts-as conversation a recipe, parts "
                                     f"of {', '.join(TRAIN_PARTS)} joined by '+')")


def preset_name(text: str) -> str:
    if text not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown preset {text!r} (choose from {', '.join(PRESETS)})")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = Parser(
        prog="python -m bench.capacity",
        description="How many synthetic facts a LoRA adapter of rank r stores: one adapter per (rank, number of "
                    "facts), exact-match recall of every trained fact, a curve per rank.")
    ap.add_argument("--preset", type=preset_name, default=None,
                    help="option defaults: cpu (ranks 1,4,16 x 10,30,100 facts, an estimated 13-17 min on 2 CPU "
                         "cores with the default model) or gpu (ranks 1..64 x 10..10,000 facts); default: gpu "
                         "when CUDA is available, else cpu. Explicit options override the preset")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="packaged name, local checkpoint dir or hub id")
    ap.add_argument("--out", type=output_dir, default=None,
                    help="run directory (default runs/capacity-<time>); reuse it to resume")
    ap.add_argument("--results-file", default=None,
                    help="also write the summary here (e.g. bench/results/capacity_cpu.json), "
                         "the plot beside it (.png)")
    g = ap.add_argument_group("grid and facts")
    g.add_argument("--ranks", type=positive_int_list, default=None,
                   help="comma-separated LoRA ranks (cpu: 1,4,16; gpu: 1,2,4,8,16,32,64)")
    g.add_argument("--facts", type=positive_int_list, default=None,
                   help="comma-separated fact counts (cpu: 10,30,100; gpu: 10,30,100,300,1000,3000,10000)")
    g.add_argument("--attributes", default=",".join(ATTRIBUTES),
                   help=f"comma-separated attributes per invented person, each one fact ({', '.join(ATTRIBUTES)})")
    g.add_argument("--seed", type=seed, default=0, help="facts, adapter init, window order")
    g.add_argument("--no-base", action="store_true", help="skip asking the base model (no adapter)")
    g = ap.add_argument_group("LoRA and training")
    g.add_argument("--facts-as", choices=FACTS_AS, default="qa",
                   help="qa: each fact trained as its own question; conversation: the facts said as turns of a "
                        "conversation, trained with a memory recipe (--train-format), asked as LoCoMo asks")
    g.add_argument("--train-format", type=capacity_train_format, default=None,
                   help="facts as qa: qa (chat QA, loss on the answers), statements (one sentence per fact, "
                        "next-token loss) or qa+statements (default qa); facts as conversation: a memory recipe "
                        "(default text+queries)")
    g.add_argument("--queries-from", choices=QUERY_SOURCES, default=Recipe.queries_from,
                   help="facts as conversation: what reads the turns for the recipe's questions (rules or parser)")
    g.add_argument("--query-phrasings", type=positive_int, default=Recipe.query_phrasings,
                   help="facts as conversation: wordings of each fact the recipe asks")
    g.add_argument("--pack", action="store_true",
                   help="pack several facts into each seq-len window (cheaper; each answer then also sees the "
                        "facts before it, unlike when asked); default: one fact per window, as it is asked")
    g.add_argument("--alpha", type=positive_float, default=None, help="LoRA alpha (default 2 x rank)")
    g.add_argument("--dropout", type=float_in(0.0, 1.0, low_open=False, high_open=True), default=0.0,
                   help="dropout on the LoRA branch")
    g.add_argument("--epochs", type=positive_int, default=None, help="passes over the facts (cpu 6, gpu 20)")
    g.add_argument("--min-steps", type=non_negative_int, default=None,
                   help="raise the epochs of a cell until it takes at least this many optimizer steps "
                        "(cpu 40, gpu 100)")
    g.add_argument("--lr", type=positive_float, default=TrainConfig.lr, help="peak learning rate, AdamW")
    g.add_argument("--batch-size", type=positive_int, default=None, help="windows per micro-batch (cpu 2, gpu 32)")
    g.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--share-prefix", action=argparse.BooleanOptionalAction, default=True,
                   help="compute the system turn and user header that every window of a micro-batch opens with once "
                        "per micro-batch (the same training up to rounding, for fewer positions: a cell's "
                        "train_tokens_computed against its train_tokens)")
    g.add_argument("--warmup-ratio", type=float_in(0.0, 1.0, low_open=False, high_open=True),
                   default=TrainConfig.warmup_ratio, help="share of the steps spent warming up the learning rate")
    g.add_argument("--seq-len", type=int_at_least(16), default=None,
                   help="longest training window in tokens (with --pack: the window length); cpu 128, gpu 256")
    g = ap.add_argument_group("answering and runtime")
    g.add_argument("--max-new-tokens", type=positive_int, default=16, help="the longest answer, in tokens")
    g.add_argument("--answer-mode", choices=ANSWER_MODES, default="direct",
                   help="direct: the question alone; recite (--facts-as conversation, a recipe with the recite "
                        "part): the adapter first recites the turn the question is about, then the base model "
                        "answers with it in context")
    g.add_argument("--answer-batch-size", type=positive_int, default=None,
                   help="questions per decoding batch (cpu 64, gpu 256)")
    g.add_argument("--device", type=device_name, metavar="{cpu,cuda}", default=None,
                   help="default: cuda if available")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help=DTYPE_DEFAULT_HELP)
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--no-plot", action="store_true", help="write no capacity.png (the plot needs matplotlib)")
    add_kernel_args(ap)
    args = ap.parse_args(argv)
    if not args.no_plot:
        ap.require("matplotlib", extra="plot", needed_for="the capacity plot (or --no-plot)")
    try:
        args.policy = KernelPolicy.from_args(args)
        return resolve_args(args)
    except (CapacityError, ValueError) as e:
        ap.error(str(e))


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from the preset and check what single options cannot (combinations, attribute names)."""
    if args.preset is None:
        cuda = torch.cuda.is_available() and (args.device is None or str(args.device).startswith("cuda"))
        args.preset = "gpu" if cuda else "cpu"
    preset = PRESETS[args.preset]
    for key in ("ranks", "facts", "epochs", "min_steps", "batch_size", "seq_len", "answer_batch_size"):
        if getattr(args, key) is None:
            setattr(args, key, list(preset[key]) if isinstance(preset[key], list) else preset[key])
    args.attributes = [a.strip() for a in args.attributes.split(",") if a.strip()]
    generate_facts(0, args.seed, args.attributes)  # checks the attribute names
    conversation = args.facts_as == "conversation"
    if args.train_format is None:
        args.train_format = "text+queries" if conversation else "qa"
    if not conversation:  # the recipe's question settings do not apply to facts trained as their own questions
        args.queries_from = args.query_phrasings = None
    if conversation:
        try:
            recipe = conversation_recipe(args)
        except ValueError as e:
            raise CapacityError(f"--train-format: {e}") from None
        if args.pack:
            raise CapacityError("--pack applies to --facts-as qa (a conversation is windowed by its recipe)")
        if args.answer_mode == "recite" and "recite" not in recipe.parts:
            raise CapacityError(f"--answer-mode recite needs an adapter trained to recite (a --train-format with "
                                f"recite, got {args.train_format!r})")
    elif args.answer_mode != "direct":
        raise CapacityError("--answer-mode recite applies to --facts-as conversation")
    elif args.train_format not in TRAIN_FORMATS:
        raise CapacityError(f"--train-format {args.train_format!r} with --facts-as qa: choose from "
                            f"{', '.join(TRAIN_FORMATS)}")
    args.question_template = CONVERSATION_QUESTION_TEMPLATE if conversation else QUESTION_TEMPLATE
    return args


def check_out(out: Path, args: argparse.Namespace) -> int:
    """Every path the run writes lies inside `out` and is not in the way; every finished cell's and the base model's
    files are read and checked. Returns how many facts the base model was already asked."""
    cells = [cell_path(out, r, n) for r in args.ranks for n in args.facts]
    files = [out / name for name in ("run_config.json", "base.json", "base.predictions.jsonl", "results.json",
                                     "table.md", "capacity.png")]
    check_writable(out, files + cells + [c.with_suffix(".predictions.jsonl") for c in cells], [out / "cells"])
    for (r, n), path in zip(((r, n) for r in args.ranks for n in args.facts), cells):
        if path.is_file():
            cell = read_run_file(path, CellFile)
            if (cell["rank"], cell["n_facts"]) != (r, n):
                raise RunFileError(f"{path}: field 'rank', 'n_facts': {cell['rank']}, {cell['n_facts']}, not {r}, {n}")
            if cell["error"] is None:
                check_predictions(path.with_suffix(".predictions.jsonl"), n)
    if args.no_base or not (out / "base.json").is_file():
        return 0
    base_done = read_run_file(out / "base.json", BaseFile)["n"]
    check_predictions(out / "base.predictions.jsonl", base_done)
    return base_done


def check_predictions(path: Path, n: int) -> None:
    rows = read_jsonl(path, FactRow) if path.is_file() else []
    if len(rows) != n:
        raise RunFileError(f"{path}: {len(rows)} rows, {n} facts were asked (truncated or missing?)")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out or Path("runs") / time.strftime("capacity-%Y%m%d-%H%M%S"))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = str(parse_dtype(args.dtype, device, args.policy)).replace("torch.", "")
    settings = {k: getattr(args, k) for k in RESULT_SETTINGS} | {"dtype": dtype, "preset": args.preset,
                                                                 "kernel_policy": args.policy.to_dict()}
    # a mismatch is refused before anything loads or is written
    check_or_write_run_config(out, settings, RESULT_SETTINGS, SETTINGS_ADDED_LATER, write=False)
    # so is a file of an earlier invocation that is corrupt, or an output path in the way
    base_done = check_out(out, args)
    ckpt = inspect_checkpoint(args.model, args.policy)  # the model's files, before the weights load
    if args.seq_len > ckpt.config.max_position_embeddings:
        raise CapacityError(f"--seq-len {args.seq_len}: longer than the model's context window of "
                            f"{ckpt.config.max_position_embeddings} positions")
    lm = load_model(args.model, device=device, dtype=args.dtype, progress=not args.quiet, policy=args.policy)
    out.mkdir(parents=True, exist_ok=True)
    check_or_write_run_config(out, settings, RESULT_SETTINGS, SETTINGS_ADDED_LATER)
    info = run_info(lm.model.lm_head.weight.device, args.policy)
    info["dtype"] = dtype
    # The stream's first max(facts) facts; every cell takes a prefix.
    all_facts = generate_facts(max(args.facts), args.seed, args.attributes)

    if not args.no_base and base_done < len(all_facts):
        base = run_base(lm, all_facts, args, out)
        print(f"[base, no adapter] {base['n']} facts: exact {100 * base['exact_match']:.1f}%, "
              f"token F1 {base['token_f1']:.3f}", file=sys.stderr)

    todo = [(r, n) for r in args.ranks for n in args.facts if not cell_path(out, r, n).is_file()]
    n_cells = len(args.ranks) * len(args.facts)
    if len(todo) < n_cells:
        print(f"resuming {out}: {n_cells - len(todo)} of {n_cells} cells already finished", file=sys.stderr)
    injected = None
    for r, n in todo:
        if injected != r:
            remove_lora(lm.model)
            device = lm.model.lm_head.weight.device
            inject_lora(lm.model, lora_config(args, r), torch.Generator(device=device).manual_seed(args.seed))
            injected = r
        c = run_cell(lm, all_facts[:n], r, args, out)
        status = (f"error: {c['error']}" if c["error"] else
                  f"exact {100 * c['exact_match']:.1f}% ({c['facts_recalled']}/{n}), F1 {c['token_f1']:.3f}")
        loss = "-" if c["final_loss"] is None else f"{c['final_loss']:.4f}"
        print(f"[r={r} n={n}] {status}, final loss {loss}, {c['epochs_run']} epochs / "
              f"{c['steps']} steps, train {c['train_seconds']:.1f}s ({c['train_tokens_per_second']:.0f} tok/s)",
              file=sys.stderr)
    remove_lora(lm.model)

    results = summarise(out, lm, args, settings, info, time.perf_counter() - t_start)
    print(results["table"])
    print(f"\nresults: {out / 'results.json'}  (wall {results['wall_seconds_this_invocation']:.0f}s)")
    return results


def cli() -> None:
    """main() with bad input as one clear line, not a traceback."""
    from lora_mem.lora_core.adapter_io import AdapterError
    from lora_mem.model.config import ConfigError
    from lora_mem.model.loader import CheckpointError
    from lora_mem.model.packaged import PackagedModelError
    from lora_mem.model.tokenizer import TokenizerError
    from lora_mem.untrusted import UnsafePathError

    try:
        main()
    except (CapacityError, RunConfigMismatch, RunFileError, ConfigError, CheckpointError, PackagedModelError,
            AdapterError, TokenizerError, UnsafePathError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted: finished cells are kept in --out; rerun the same command to resume",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
