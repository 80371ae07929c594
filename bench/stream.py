"""LoCoMo as a stream: each conversation's sessions written one at a time (`Memory.append`), questions asked along
the way.

    python -m bench.stream --strategy continue --train-format text+queries --query-phrasings 1 --out runs/stream
    python -m bench.stream --strategy rewrite --block 5 ...       # a fresh adapter on all sessions every 5 sessions
    python -m bench.stream --strategy modules --compose route ...
    python -m bench.stream --strategy modules --route-top-k 4 --modules-from runs/stream-modules ...   # answer only

For each conversation, in session order: append (``--block`` sessions at a time), and after every ``--every``-th
session, after the first quarter of the sessions and after the last, ask the questions whose evidence lies wholly in
the sessions written so far (after the last: every question). The evidence ids only decide which questions are
askable (an analysis, as `bench.analysis.shuffle_control` is); training sees the sessions alone. Reported:

    final         F1 and question-specific F1 (`shuffle_control`) of every question after the last session
    curve         F1 of the askable questions at each checkpoint
    forgetting    F1 on the questions about the first quarter of the sessions, right after they were written and at
                  every later checkpoint
    cost          training tokens and seconds per append and in total, beside the all-at-once write (``--reference``,
                  a bench.locomo run of the same training settings)

``--modules-from RUN_DIR`` (modules only) trains nothing: it asks the modules an earlier modules run wrote (same
training settings, read in place) at the same checkpoints, composed as this run says, so compositions compare on
the same modules; the cost reported is that run's.

Outputs land under ``--out`` as they are made (atomically) and a rerun resumes, as bench.locomo's do:

    <out>/run_config.json                              settings (a resume must match them)
    <out>/conversations/<id>/memory/                   the memory folder, grown (its manifest records each append)
    <out>/conversations/<id>/checkpoints/<n>.jsonl     predictions after n sessions; <n>.json marks it complete
    <out>/conversations/<id>/result.json               the conversation finished
    <out>/results.json, table.md, predictions.jsonl    the whole run (predictions: after the last session)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import bench.locomo as locomo
from bench.analysis.shuffle_control import control
from bench.common import (
    RunConfigMismatch,
    RunFileError,
    atomic_write_json,
    atomic_write_text,
    check_or_write_run_config,
    read_jsonl,
    read_results_json,
    read_run_file,
    run_info,
    write_jsonl,
)
from bench.locomo_data import (
    LocomoDataError,
    Sample,
    file_sha256,
    iter_samples,
    load_locomo,
    resolve_data_path,
    select_questions,
)
from bench.locomo_score import aggregate, format_table, score_qa
from lora_mem.cli import Parser, fail, float_in, id_list, output_dir, positive_int
from lora_mem.kernels.policy import KernelPolicy, add_kernel_args
from lora_mem.lora_core.adapter_io import AdapterError
from lora_mem.lora_core.conversation import conversation_only
from lora_mem.lora_core.growth import new_memory, open_memory
from lora_mem.lora_core.memory import COMPOSITIONS, GROWTH_STRATEGIES, GrowthConfig, Memory
from lora_mem.lora_core.memory_folder import MANIFEST_NAME, MemoryFolderError, read_memory_folder
from lora_mem.model.config import ConfigError, ModelConfig
from lora_mem.model.loader import CheckpointError, load_model, resolve_checkpoint
from lora_mem.model.packaged import PackagedModelError
from lora_mem.model.tokenizer import Tokenizer

# bench.locomo's options that apply to a stream: the model, what is asked, the memory's settings, the runtime.
LOCOMO_OPTIONS = tuple(o for o in locomo.OPTIONS if o.group in ("adapter and training", "answering and runtime")
                       and o.dest not in ("adapters_from", "shared_batches", "answer_mode")
                       or o.dest in ("model", "max_questions"))
GROWTH_OPTIONS = {"strategy": "strategy", "replay_ratio": "replay_ratio", "reset_optimizer": "keep_optimizer",
                  "compose": "compose", "route_top_k": "route_top_k"}  # option dest -> GrowthConfig field
STREAM_SETTINGS = tuple(GROWTH_OPTIONS) + ("every", "block", "modules_from")
# What a --modules-from run must share with this one: all that makes its modules what they are.
MODULES_FROM_SETTINGS = ("model", "dtype", "seed", "block", "data_sha256") + locomo.TRAINING_SETTINGS
EVIDENCE_SESSION = re.compile(r"D:?(\d+):")  # "D8:6", and the file's few "D:11:26"


@dataclass(frozen=True)
class StreamConfig:
    """One streaming run: when questions are asked, how many sessions one append writes, and everything else as a
    bench.locomo run of method lora (its memory config holds the growth strategy)."""

    every: int = 5  # ask after every k-th session (and after the first quarter and the last)
    block: int = 1  # sessions per append
    modules_from: str | None = None  # modules: answer with an earlier run's modules, train nothing
    locomo: locomo.LocomoConfig = field(default_factory=locomo.LocomoConfig)

    @property
    def growth(self) -> GrowthConfig:
        return self.locomo.memory.growth


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

def build_parser() -> Parser:
    ap = Parser(prog="python -m bench.stream",
                description="LoCoMo as a stream: sessions appended one at a time, questions asked along the way.")
    ap.add_argument("--data", default=None, help="a LoCoMo-layout JSON file (else $LOCOMO_DATA, the cache, or a "
                                                  "pinned download of locomo10.json)")
    ap.add_argument("--out", type=output_dir, default=None, help="run directory (default runs/<time>); reuse it "
                                                                 "to resume")
    ap.add_argument("--conversations", type=id_list, default=None, help="comma-separated sample ids, e.g. "
                                                                        "conv-26,conv-30")
    ap.add_argument("--reference", metavar="RUN_DIR", default=None, help="a bench.locomo run of the same training "
                    "settings (the all-at-once write): its F1 and cost are reported beside the stream's")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    growth, stream = GrowthConfig(), StreamConfig()
    g = ap.add_argument_group("stream")
    g.add_argument("--strategy", choices=GROWTH_STRATEGIES, default=growth.strategy,
                   help="rewrite: a fresh adapter on every session so far; continue: the same adapter on the new "
                        "session and a replay sample of earlier ones; modules: an adapter per append, composed at "
                        "answer time")
    g.add_argument("--replay-ratio", type=float_in(0.0, low_open=False), default=growth.replay_ratio,
                   help="continue: earlier windows replayed per new window")
    g.add_argument("--reset-optimizer", action="store_true", help="continue: a fresh AdamW at every append "
                   "(default: its state goes on)")
    g.add_argument("--compose", choices=COMPOSITIONS, default=growth.compose, help="modules: route each question "
                   "to its best modules by BM25 over their training questions, or sum every module")
    g.add_argument("--route-top-k", type=positive_int, default=growth.route_top_k, help="modules, route: modules "
                   "summed for each question")
    g.add_argument("--every", type=positive_int, default=stream.every, help="ask after every k-th session")
    g.add_argument("--block", type=positive_int, default=stream.block, help="sessions written per append")
    g.add_argument("--modules-from", metavar="RUN_DIR", default=None, help="modules: train nothing; ask the modules "
                   "an earlier modules run of the same training settings wrote, composed as this run says")
    defaults = locomo.LocomoConfig()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for o in LOCOMO_OPTIONS:
        group = groups.get(o.group) or groups.setdefault(o.group, ap.add_argument_group(o.group))
        group.add_argument(o.flag, dest=o.dest, **{"default": locomo.config_value(defaults, o.path), **o.kwargs})
    add_kernel_args(ap)
    return ap


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, StreamConfig]:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        config = locomo.config_from({o.dest: getattr(args, o.dest) for o in LOCOMO_OPTIONS}, locomo.LocomoConfig())
        growth = GrowthConfig(args.strategy, args.replay_ratio, not args.reset_optimizer, args.compose,
                              args.route_top_k)
        memory = dataclasses.replace(config.memory, growth=growth)
        config = dataclasses.replace(config, memory=memory, kernels=KernelPolicy.from_args(args))
    except ValueError as e:
        ap.error(str(e))
    if args.modules_from is not None and args.strategy != "modules":
        ap.error(f"--modules-from {args.modules_from}: only with --strategy modules, not {args.strategy}")
    return args, StreamConfig(args.every, args.block, args.modules_from, config)


def settings_of(config: StreamConfig) -> dict:
    """run_config.json's keys: bench.locomo's (method lora) and the stream's, those that do not apply None."""
    g = config.growth
    settings = locomo.settings_of(config.locomo) | {
        "strategy": g.strategy, "replay_ratio": g.replay_ratio if g.strategy == "continue" else None,
        "reset_optimizer": not g.keep_optimizer if g.strategy == "continue" else None,
        "compose": g.compose if g.strategy == "modules" else None,
        "route_top_k": g.route_top_k if g.strategy == "modules" and g.compose == "route" else None,
        "every": config.every, "block": config.block, "modules_from": config.modules_from}
    for k in ("method", "context_tokens", "top_k", "rag_unit", "adapters_from", "shared_batches", "with_adversarial",
              "answer_mode"):
        settings.pop(k, None)
    return settings


RESULT_SETTINGS = tuple(k for k in locomo.RESULT_SETTINGS if k not in (
    "method", "context_tokens", "top_k", "rag_unit", "adapters_from", "with_adversarial", "answer_mode")) \
    + STREAM_SETTINGS
# What a reference (all-at-once) run must share with the stream to be its reference.
REFERENCE_SETTINGS = ("model", "dtype", "seed", "max_new_tokens", "max_questions") + locomo.TRAINING_SETTINGS


def strategy_label(config: StreamConfig) -> str:
    g = config.growth
    how = {"rewrite": "rewrite", "continue": f"continue, replay {g.replay_ratio:g}, optimizer "
                                            f"{'kept' if g.keep_optimizer else 'reset'}",
           "modules": f"modules, {'sum' if g.compose == 'sum' else f'route top-{g.route_top_k}'}"}[g.strategy]
    return how + (f", {config.block} sessions per append" if config.block > 1 else "")


def method_label(config: StreamConfig) -> str:
    return f"stream ({strategy_label(config)}) of {locomo.method_label(config.locomo)}"


# ---------------------------------------------------------------------------------------------
# Which questions are asked when (analysis: the evidence ids never reach training)
# ---------------------------------------------------------------------------------------------

def evidence_session(qa) -> int | None:
    """The last session a question's evidence lies in (its session index), None if it names none."""
    sessions = [int(m) for e in qa.evidence for m in EVIDENCE_SESSION.findall(e)]
    return max(sessions) if sessions else None


def first_quarter(n_sessions: int) -> int:
    return math.ceil(n_sessions / 4)


def checkpoints(n_sessions: int, every: int) -> list[int]:
    """After how many sessions written questions are asked: every k-th, the first quarter, the last."""
    return sorted(set(range(every, n_sessions + 1, every)) | {first_quarter(n_sessions), n_sessions})


def append_ends(n_sessions: int, every: int, block: int) -> list[int]:
    """After how many sessions each append ends: every block-th session, and every checkpoint."""
    return sorted(set(range(block, n_sessions + 1, block)) | set(checkpoints(n_sessions, every)))


def askable(sample: Sample, questions: list, written: int) -> list[int]:
    """Indices of the questions whose evidence lies wholly in the first ``written`` sessions (after the last
    session: all of them)."""
    if written == len(sample.sessions):
        return list(range(len(questions)))
    last = sample.sessions[written - 1].index
    return [i for i, q in enumerate(questions) if (s := evidence_session(q)) is not None and s <= last]


def forgetting_set(sample: Sample, questions: list) -> set[int]:
    """The questions about the first quarter of the sessions (their evidence wholly in it)."""
    return set(askable(sample, questions, first_quarter(len(sample.sessions))))


# ---------------------------------------------------------------------------------------------
# One conversation
# ---------------------------------------------------------------------------------------------

def conversation_dir(out: Path, sample_id: str) -> Path:
    return out / "conversations" / sample_id


def conversation_state(out: Path, sample_id: str) -> str:
    """"finished", "failed" or "todo"; every file an earlier invocation left is read here, before any work, so a
    damaged one is an error that names it."""
    conv_dir = conversation_dir(out, sample_id)
    if (conv_dir / "memory" / MANIFEST_NAME).is_file():
        read_memory_folder(conv_dir / "memory")
    for marker in sorted((conv_dir / "checkpoints").glob("*.json")):
        read_run_file(marker)
    if not (conv_dir / "result.json").is_file():
        return "todo"
    return "failed" if read_run_file(conv_dir / "result.json").get("error") else "finished"


def ask(memory: Memory, sample: Sample, questions: list, written: int, conv_dir: Path, quiet: bool,
        modules: int | None = None, route_top_k: int | None = None) -> dict:
    """Answer the questions askable after ``written`` sessions; write their predictions, then the marker.
    ``modules``, ``route_top_k``: a memory of modules answers as Memory.answer takes them."""
    idx = askable(sample, questions, written)
    asked = [questions[i].question for i in idx]
    t0 = time.perf_counter()
    answers = memory.answer(asked, progress=not quiet, modules=modules, route_top_k=route_top_k) if asked else []
    seconds = time.perf_counter() - t0
    routed = {}
    if memory.config.growth.strategy == "modules" and asked:
        routes = memory.folder.routes(asked, modules=modules, top_k=route_top_k)
        routed = {i: list(m) for m, rows in routes for i in rows}
    rows = []
    for j, (i, pred) in enumerate(zip(idx, answers)):
        qa = questions[i]
        gold = locomo.gold_answer(qa)
        rows.append({"sample_id": sample.sample_id, "question": qa.question, "answer": gold, "category": qa.category,
                     "prediction": pred, "f1": score_qa(pred, gold, qa.category), "question_index": i,
                     "evidence_session": evidence_session(qa), "sessions_written": written}
                    | ({"modules": routed[j]} if routed else {}))
    write_jsonl(conv_dir / "checkpoints" / f"{written}.jsonl", rows)
    marker = {"sessions_written": written, "asked": len(rows), "answer_seconds": seconds}
    atomic_write_json(conv_dir / "checkpoints" / f"{written}.json", marker)
    return marker


def stream_memory(lm, config: StreamConfig, sample: Sample, mem_dir: Path) -> Memory:
    """The conversation's memory folder as an earlier invocation left it, or a new one."""
    if (mem_dir / MANIFEST_NAME).is_file():
        return open_memory(read_memory_folder(mem_dir), lm)
    return new_memory(lm, config.locomo.memory, mem_dir, name=sample.sample_id,
                      speakers=(sample.speaker_a, sample.speaker_b))


def modules_written(manifest, sessions: list, written: int) -> int:
    """How many appends of a memory's manifest lie wholly in the first ``written`` sessions (a RunFileError where
    an append runs past them: the memory never stood there)."""
    last = sessions[written - 1].index
    ends = [max(w["sessions"]) for w in manifest.writes]
    if last not in ends:
        raise RunFileError(f"no append of the memory ends at session {last} (its appends end at {ends}): "
                           "--modules-from needs a run with this run's checkpoints among its append ends")
    return ends.index(last) + 1


def conversation_start(sample: Sample, config: StreamConfig, out: Path) -> tuple[Path, list, list, set[int]]:
    """(the conversation's run folder, its questions, its sessions alone, the checkpoints already asked)."""
    conv_dir = conversation_dir(out, sample.sample_id)
    questions = select_questions(sample, False, config.locomo.max_questions)
    sessions = conversation_only(sample).sessions  # what is written: the sessions alone
    done = {int(p.stem) for p in (conv_dir / "checkpoints").glob("*.json")}
    return conv_dir, questions, sessions, done


def ask_modules_from(sample: Sample, lm, config: StreamConfig, out: Path, quiet: bool) -> dict:
    """The conversation's checkpoints asked of the modules another run wrote (--modules-from), none trained."""
    conv_dir, questions, sessions, done = conversation_start(sample, config, out)
    source = conversation_dir(Path(config.modules_from), sample.sample_id) / "memory"
    folder = read_memory_folder(source)
    if len(folder.manifest.sessions) != len(sessions):
        raise RunFileError(f"{source}: holds {len(folder.manifest.sessions)} of the {len(sessions)} sessions; "
                           "finish that run first")
    memory = open_memory(folder, lm)
    g = config.growth
    for written in checkpoints(len(sessions), config.every):
        if written not in done:
            k = modules_written(folder.manifest, sessions, written)
            ask(memory, sample, questions, written, conv_dir, quiet, modules=k,
                route_top_k=k if g.compose == "sum" else g.route_top_k)
    result = {"sample_id": sample.sample_id, "n_sessions": len(sessions), "n_questions": len(questions),
              "error": None, "modules_from": str(source)}
    result.update(conversation_summary(sample, questions, folder.manifest, conv_dir))
    atomic_write_json(conv_dir / "result.json", result)
    return result


def run_conversation(sample: Sample, lm, config: StreamConfig, out: Path, quiet: bool) -> dict:
    if config.modules_from is not None:
        return ask_modules_from(sample, lm, config, out, quiet)
    conv_dir, questions, sessions, done = conversation_start(sample, config, out)
    n = len(sessions)
    asks = checkpoints(n, config.every)
    memory = stream_memory(lm, config, sample, conv_dir / "memory")
    written = len(memory.folder.folder.manifest.sessions) if memory.folder.folder else 0
    if any(c < written and c not in done for c in asks):
        raise RunFileError(f"{conv_dir}: the memory holds {written} sessions but a checkpoint before that has no "
                           "predictions; move the conversation's folder away to redo it")
    result = {"sample_id": sample.sample_id, "n_sessions": n, "n_questions": len(questions), "error": None}
    if written in asks and written not in done:
        ask(memory, sample, questions, written, conv_dir, quiet)
    start = written
    for end in append_ends(n, config.every, config.block):
        if end <= start:
            continue
        appended = memory.append(sessions[start:end], progress=not quiet)
        if appended.error:
            result["error"] = f"append of sessions {appended.sessions} failed: {appended.error}"
            atomic_write_json(conv_dir / "result.json", result)
            return result
        if not quiet:
            print(f"[{sample.sample_id}] sessions 1-{end} written ({appended.train.tokens} tokens, "
                  f"{appended.seconds:.0f} s)", file=sys.stderr)
        if end in asks:
            ask(memory, sample, questions, end, conv_dir, quiet)
        start = end
    result.update(conversation_summary(sample, questions, memory.folder.folder.manifest, conv_dir))
    atomic_write_json(conv_dir / "result.json", result)
    return result


def conversation_summary(sample: Sample, questions: list, manifest, conv_dir: Path) -> dict:
    """Checkpoints (F1 of the askable questions, of the first quarter's), and each append's cost (the memory's
    manifest), from the files."""
    forget = forgetting_set(sample, questions)
    q = first_quarter(len(sample.sessions))
    turns = {s.index: s.turns for s in manifest.sessions}
    points = []
    for marker_file in sorted((conv_dir / "checkpoints").glob("*.json"), key=lambda p: int(p.stem)):
        marker = read_run_file(marker_file)
        rows = read_jsonl(marker_file.with_suffix(".jsonl"))
        first = [r for r in rows if r["question_index"] in forget]
        points.append({**marker, "f1": aggregate(rows),
                       "forgetting_f1": 100.0 * sum(r["f1"] for r in first) / len(first)
                       if first and marker["sessions_written"] >= q else None})
    appends = [{"append": a["append"], "sessions": a["sessions"], "turns": sum(turns[s] for s in a["sessions"]),
                "windows": a["windows"], "replay_windows": len(a["replay"]["indices"]) if a["replay"] else 0,
                "train_tokens": a["tokens"], "train_seconds": a["seconds"], "data_seconds": a["data_seconds"],
                "seconds": a["append_seconds"]} for a in manifest.writes]
    return {"first_quarter_sessions": q, "forgetting_questions": len(forget), "checkpoints": points,
            "appends": appends, "train_tokens": sum(a["train_tokens"] for a in appends),
            "train_seconds": sum(a["train_seconds"] for a in appends),
            "append_seconds": sum(a["seconds"] for a in appends)}


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------

def mean_f1(rows: list[dict]) -> float | None:
    return 100.0 * sum(r["f1"] for r in rows) / len(rows) if rows else None


def checkpoint_rows(out: Path, sample_id: str, written: int) -> list[dict]:
    return read_jsonl(conversation_dir(out, sample_id) / "checkpoints" / f"{written}.jsonl")


def setting_diffs(theirs: dict, settings: dict, keys: tuple[str, ...]) -> list[str]:
    """Each of ``keys`` on which another run's settings differ from this run's, as "key: X there, Y here"."""
    return [f"{k}: {theirs.get(k)!r} there, {settings.get(k)!r} here" for k in keys if theirs.get(k) != settings.get(k)]


def read_reference(run_dir: str, settings: dict, samples: list[Sample]) -> dict:
    """The all-at-once write of the same conversations with the same training settings (a bench.locomo run): its
    final rows and training cost. Any mismatch is refused before the model loads."""
    results = read_results_json(Path(run_dir) / "results.json", "a bench.locomo run", RunConfigMismatch)
    theirs = results.get("settings", {})
    if theirs.get("method") != "lora":
        raise RunConfigMismatch(f"--reference {run_dir}: a {theirs.get('method')!r} run, not an all-at-once write "
                                "(method lora)")
    diffs = setting_diffs(theirs, settings, REFERENCE_SETTINGS)
    if diffs:
        raise RunConfigMismatch(f"--reference {run_dir}: other training settings ({'; '.join(diffs)})")
    if theirs.get("data_sha256") not in (None, settings["data_sha256"]):
        raise RunConfigMismatch(f"--reference {run_dir}: made from another data file (sha256 {theirs['data_sha256']})")
    wanted = {s.sample_id for s in samples}
    convs = {c["sample_id"]: c for c in results.get("conversations", []) if c["sample_id"] in wanted}
    missing = sorted(wanted - set(convs))
    if missing:
        raise RunConfigMismatch(f"--reference {run_dir}: has no {', '.join(missing)}")
    rows = [r for r in read_jsonl(Path(run_dir) / "predictions.jsonl") if r["sample_id"] in wanted
            and r["category"] != 5]
    return {"run": str(run_dir), "git_commit": results.get("git_commit"), "device": results.get("device"),
            "method": results.get("method"), "rows": rows,
            "train_tokens": sum(c["train_tokens"] for c in convs.values()),
            "train_seconds": sum(c["train_seconds"] for c in convs.values()),
            "data_seconds": sum(c.get("data_seconds", 0.0) for c in convs.values())}


def check_modules_from(run_dir: str, settings: dict) -> None:
    """A --modules-from run: a modules stream of the same training settings on the same data, every conversation
    asked here finished there. Refused before the model loads."""
    theirs = read_run_file(Path(run_dir) / "run_config.json")
    if theirs.get("strategy") != "modules" or theirs.get("modules_from"):
        raise RunConfigMismatch(f"--modules-from {run_dir}: not a modules run that trained its own modules "
                                f"(strategy {theirs.get('strategy')!r}, modules_from {theirs.get('modules_from')!r})")
    diffs = setting_diffs(theirs, settings, MODULES_FROM_SETTINGS)
    if diffs:
        raise RunConfigMismatch(f"--modules-from {run_dir}: other training settings ({'; '.join(diffs)})")
    missing = [c for c in settings["conversations"]
               if not (conversation_dir(Path(run_dir), c) / "result.json").is_file()]
    if missing:
        raise RunConfigMismatch(f"--modules-from {run_dir}: has not finished {', '.join(missing)}")


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def pooled_curve(out: Path, samples: list[Sample], every: int) -> list[dict]:
    """F1 of the askable questions after every k-th session, pooled over the conversations that have that many
    (a conversation's last session is its "final" point, asked everything)."""
    points = []
    longest = max(len(s.sessions) for s in samples)
    for written in range(every, longest, every):
        having = [s for s in samples if written < len(s.sessions)]
        rows = [r for s in having for r in checkpoint_rows(out, s.sample_id, written)]
        if having:
            points.append({"sessions_written": written, "conversations": len(having), "asked": len(rows),
                           "f1": aggregate(rows)})
    rows = [r for s in samples for r in checkpoint_rows(out, s.sample_id, len(s.sessions))]
    points.append({"sessions_written": "final", "conversations": len(samples), "asked": len(rows),
                   "f1": aggregate(rows)})
    return points


def pooled_forgetting(out: Path, samples: list[Sample], every: int) -> dict:
    """F1 on the first quarter's questions right after the first quarter was written and at every later checkpoint,
    pooled over the conversations; the ratio after the last session to right after."""
    series: dict[str, list[dict]] = {}
    for s in samples:
        questions = select_questions(s, False, None)
        forget = forgetting_set(s, questions)
        q, n = first_quarter(len(s.sessions)), len(s.sessions)
        for written in checkpoints(n, every):
            if written < q:
                continue
            key = "written" if written == q else "final" if written == n else str(written)
            series.setdefault(key, []).extend(r for r in checkpoint_rows(out, s.sample_id, written)
                                              if r["question_index"] in forget)
    order = ["written"] + sorted((k for k in series if k not in ("written", "final")), key=int) + ["final"]
    points = [{"sessions_written": k, "questions": len(series[k]), "f1": mean_f1(series[k])} for k in order
              if k in series]
    at = {p["sessions_written"]: p["f1"] for p in points}
    return {"points": points, "final_over_written": ratio(at.get("final"), at.get("written"))}


def seconds_summary(seconds: list[float]) -> dict:
    return {"n": len(seconds), "seconds_mean": statistics.fmean(seconds) if seconds else None,
            "seconds_median": statistics.median(seconds) if seconds else None,
            "seconds_max": max(seconds, default=None)}


def cost_summary(conv_results: list[dict], reference: dict | None) -> dict:
    """Training tokens and seconds over the stream; the seconds of an append (data, training, writing the folder)
    overall and for blocks of 25 to 35 turns (median beside mean: a shared CPU makes some appends wait)."""
    appends = [a for r in conv_results for a in r["appends"]]
    every = seconds_summary([a["seconds"] for a in appends])
    cost = {"appends": len(appends), "train_tokens": sum(a["train_tokens"] for a in appends),
            "train_seconds": sum(a["train_seconds"] for a in appends),
            "append_seconds": sum(a["seconds"] for a in appends),
            "append_seconds_mean": every["seconds_mean"], "append_seconds_median": every["seconds_median"],
            "append_seconds_max": every["seconds_max"],
            "appends_of_25_to_35_turns": seconds_summary([a["seconds"] for a in appends if 25 <= a["turns"] <= 35])}
    if reference:
        cost["all_at_once"] = {k: reference[k] for k in ("train_tokens", "train_seconds", "data_seconds")}
        cost["train_tokens_over_all_at_once"] = ratio(cost["train_tokens"], reference["train_tokens"])
        cost["train_seconds_over_all_at_once"] = ratio(cost["train_seconds"], reference["train_seconds"])
    return cost


def final_scores(rows: list[dict]) -> dict:
    return {"f1": aggregate(rows), "question_specific": control(rows)}


def summarise(out: Path, samples: list[Sample], config: StreamConfig, settings: dict, info: dict,
              reference: dict | None, wall: float) -> dict:
    conv_results = [read_run_file(conversation_dir(out, s.sample_id) / "result.json") for s in samples]
    failed = {r["sample_id"]: r["error"] for r in conv_results if r.get("error")}
    label = method_label(config) + (f" (INCOMPLETE: {len(failed)} of {len(samples)} conversations failed)"
                                    if failed else "")
    results = {"method": label, "strategy": strategy_label(config), "settings": settings,
               "config": config.locomo.to_dict(), **info, "n_conversations": len(samples), "failed": failed,
               "wall_seconds_this_invocation": wall}
    if not failed:
        final = [r for s in samples for r in checkpoint_rows(out, s.sample_id, len(s.sessions))]
        write_jsonl(out / "predictions.jsonl", final)
        results["final"] = final_scores(final)
        results["curve"] = pooled_curve(out, samples, config.every)
        results["forgetting"] = pooled_forgetting(out, samples, config.every)
        results["cost"] = cost_summary(conv_results, reference)
        if reference:
            ref = final_scores(reference["rows"])
            results["all_at_once"] = {k: reference[k] for k in ("run", "git_commit", "device", "method")} | ref
            results["final_over_all_at_once"] = {
                "avg_f1": ratio(results["final"]["f1"]["avg_f1"], ref["f1"]["avg_f1"]),
                "question_specific": ratio(results["final"]["question_specific"]["avg"]["question_specific"],
                                           ref["question_specific"]["avg"]["question_specific"])}
    results["conversations"] = conv_results
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "table.md", render(results))
    return results


def render(results: dict) -> str:
    if results["failed"]:
        return f"{results['method']}\n\n" + "\n".join(f"FAILED {k}: {v}" for k, v in results["failed"].items()) + "\n"
    rows = [(results["method"], results["final"]["f1"])]
    if "all_at_once" in results:
        rows.append((f"all at once: {results['all_at_once']['method']}", results["all_at_once"]["f1"]))
    lines = ["After the last session, every question:", "", format_table(rows), ""]
    qs = results["final"]["question_specific"]["avg"]["question_specific"]
    line = f"Question-specific Avg F1: {qs:.2f}"
    if "all_at_once" in results:
        ref = results["all_at_once"]["question_specific"]["avg"]["question_specific"]
        line += (f" (all at once {ref:.2f}; ratio {fmt(results['final_over_all_at_once']['question_specific'])}); "
                 f"Avg F1 ratio {fmt(results['final_over_all_at_once']['avg_f1'])}")
    lines += [line, "", "Curve (Avg F1 of the questions askable after n sessions):", "",
              "| sessions written | conversations | questions | Avg F1 |", "|---|---|---|---|"]
    lines += [f"| {p['sessions_written']} | {p['conversations']} | {p['asked']} | {p['f1']['avg_f1'] or 0:.2f} |"
              for p in results["curve"]]
    forgetting = results["forgetting"]
    lines += ["", "Forgetting (mean F1 of the questions about the first quarter of the sessions):", "",
              "| checkpoint | questions | F1 |", "|---|---|---|"]
    lines += [f"| {p['sessions_written']} | {p['questions']} | {p['f1'] or 0:.2f} |" for p in forgetting["points"]]
    if forgetting["final_over_written"] is not None:
        lines += ["", f"After the last session / right after written: {fmt(forgetting['final_over_written'])}"]
    cost = results["cost"]
    lines += ["", f"Cost: {cost['appends']} appends, {cost['train_tokens']:,} training tokens, "
              f"{cost['train_seconds']:.0f} s training, {cost['append_seconds']:.0f} s appending (data, training, "
              f"saving); an append {cost['append_seconds_median']:.1f} s median, "
              f"{cost['append_seconds_mean']:.1f} s mean, {cost['append_seconds_max']:.1f} s at most"]
    about_30 = cost["appends_of_25_to_35_turns"]
    if about_30["n"]:
        lines.append(f"Appends of 25-35 turns: {about_30['n']}, {about_30['seconds_median']:.1f} s median, "
                     f"{about_30['seconds_mean']:.1f} s mean, {about_30['seconds_max']:.1f} s at most")
    if "all_at_once" in cost:
        lines.append(f"All at once: {cost['all_at_once']['train_tokens']:,} training tokens, "
                     f"{cost['all_at_once']['train_seconds']:.0f} s training (its own run); tokens ratio "
                     f"{fmt(cost['train_tokens_over_all_at_once'])}, seconds ratio "
                     f"{fmt(cost['train_seconds_over_all_at_once'])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args, config = parse_args(argv)
    t_start = time.perf_counter()
    if config.locomo.threads is not None:
        torch.set_num_threads(config.locomo.threads)
    data_path = resolve_data_path(args.data)
    samples = load_locomo(data_path)
    if args.conversations:
        samples = iter_samples(samples, args.conversations)
    out = Path(args.out or Path("runs") / time.strftime("stream-%Y%m%d-%H%M%S"))

    # Everything that can be refused is checked before the weights load and before --out is written.
    ckpt = resolve_checkpoint(config.locomo.model)
    locomo.check_seq_len(config.locomo, Tokenizer.from_dir(ckpt, ModelConfig.from_file(ckpt / "config.json")))
    device = torch.device(config.locomo.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = settings_of(config) | {
        "data": str(data_path), "data_sha256": file_sha256(data_path), "device_type": device.type,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "kernel_policy": config.locomo.kernels.to_dict(), "conversations": [s.sample_id for s in samples]}
    reference = read_reference(args.reference, settings, samples) if args.reference else None
    if config.modules_from is not None:
        check_modules_from(config.modules_from, settings)
    check_or_write_run_config(out, settings, RESULT_SETTINGS, write=False)
    states = {s.sample_id: conversation_state(out, s.sample_id) for s in samples}
    out.mkdir(parents=True, exist_ok=True)
    check_or_write_run_config(out, settings, RESULT_SETTINGS)

    lm = load_model(config.locomo.model, device=device, dtype=config.locomo.dtype, progress=not args.quiet,
                    policy=config.locomo.kernels)
    info = run_info(lm.model.lm_head.weight.device, config.locomo.kernels)
    todo = [s for s in samples if states[s.sample_id] != "finished"]
    if len(todo) < len(samples):
        print(f"resuming {out}: {len(samples) - len(todo)} of {len(samples)} conversations already finished",
              file=sys.stderr)
    try:
        for s in todo:
            r = run_conversation(s, lm, config, out, args.quiet)
            final = r["checkpoints"][-1]["f1"]["avg_f1"] if not r["error"] else None
            status = f"FAILED: {r['error']}" if r["error"] else f"final avg F1 {final or 0:.2f}"
            print(f"[{s.sample_id}] {r['n_sessions']} sessions, {status}", file=sys.stderr)
    except KeyboardInterrupt as e:
        raise locomo.Interrupted(out) from e
    results = summarise(out, samples, config, settings, info, reference, time.perf_counter() - t_start)
    print(render(results))
    print(f"results: {out / 'results.json'}")
    return results


def cli() -> None:
    try:
        results = main()
    except (LocomoDataError, ConfigError, CheckpointError, PackagedModelError, AdapterError, RunConfigMismatch,
            RunFileError, MemoryFolderError) as e:
        fail(str(e))
    except locomo.Interrupted as e:
        fail(f"interrupted: what was written is kept in {e.out}; rerun with --out {e.out} (and the same settings) "
             "to resume", 130)
    except KeyboardInterrupt:
        fail("interrupted before the run started: nothing was written", 130)
    if results["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    cli()
