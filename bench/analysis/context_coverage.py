"""Did the context hold the answer? Evidence coverage of ICL, RAG and recitation prompts, and F1 with and without it.

A context baseline can fail two ways: the turns that answer the question were not in the prompt (ICL keeps only
the latest sessions; BM25 misses paraphrases), or they were and the model did not use them. LoCoMo annotates each
question with its evidence turns (``evidence``: dia_ids such as ``D3:7``). This analysis, never training, reads
them: for each question of a finished icl / rag / lora+rag run it rebuilds which turns the prompt held (the BM25 hits
recorded with each prediction; the ICL suffix rebuilt by the same deterministic code the run used; for a run with
``--answer-mode recite``, the turn its recitation reproduces: the conversation's turn of highest token F1 with the
recitation, when that F1 is at least ``RECITED_TURN_F1``) and splits the questions into

    all:  every evidence turn was in the prompt
    some: at least one, not all
    none: none was
    n/a:  the question has no evidence annotation

reporting count and token F1 per split, and, for runs given with ``--compare`` (e.g. the base model), the F1 of
the same questions there: the gain that the context brought where it held the answer.

    python -m bench.analysis.context_coverage runs/locomo-icl runs/locomo-rag --compare runs/locomo-base \\
        --out bench/results/locomo/context_coverage
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path

from bench.analysis.report import load_run
from bench.common import atomic_write_json, atomic_write_text, read_jsonl
from bench.context import icl_context
from bench.locomo_data import load_locomo, resolve_data_path, select_questions
from bench.locomo_score import counts_f1, stem_counts
from lora_mem.cli import Parser, id_list
from lora_mem.lora_core.conversation import conversation_only
from lora_mem.model.loader import resolve_checkpoint
from lora_mem.model.tokenizer import Tokenizer

SPLITS = ("all", "some", "none", "n/a")
# A recitation counts as a turn's when it shares at least half its tokens with it (token F1, LoCoMo's stemming):
# the adapter recites "On <date>, <speaker> said: <turn>", so a faithful recitation scores near 1 and an invented
# one scores like any two turns of the same conversation (well under 0.5).
RECITED_TURN_F1 = 0.5
_DIA_ID = re.compile(r"D\d+:\d+")


def evidence_ids(evidence: list[str]) -> set[str]:
    """dia_ids of a question's evidence; LoCoMo writes a few as 'D8:6; D9:17' or 'D9:1 D4:4', and a few are
    malformed ('D', 'D:11:26'): those are dropped, and a question left with none counts as unannotated."""
    return {m.group(0) for e in evidence for m in _DIA_ID.finditer(e)}


def split_of(evidence: set[str], in_context: set[str]) -> str:
    if not evidence:
        return "n/a"
    held = len(evidence & in_context)
    return "all" if held == len(evidence) else "some" if held else "none"


def read_predictions(run_dir: Path) -> dict[str, list[dict]]:
    by_sample: dict[str, list[dict]] = defaultdict(list)
    for row in read_jsonl(run_dir / "predictions.jsonl"):
        by_sample[row["sample_id"]].append(row)
    return by_sample


def recited_turn(recitation: str, turns: dict[str, Counter]) -> set[str]:
    """The dia_id of the turn a recitation reproduces (``turns``: dia_id -> its `stem_counts`), or nothing."""
    recited = stem_counts(recitation)
    if not recited or not turns:
        return set()
    f1 = {d: counts_f1(recited, c) for d, c in turns.items()}
    best = max(f1, key=f1.get)
    return {best} if f1[best] >= RECITED_TURN_F1 else set()


def contexts_of_run(run_dir: Path, results: dict, predictions: dict[str, list[dict]],
                    samples: dict) -> dict[str, list[set[str]]]:
    """For each conversation of the run, the dia_ids its prompt held, per question (in the run's question order)."""
    settings = results["settings"]
    method = settings["method"]
    tokenizer = None  # ICL only: the budget is in the run's model's tokens
    out = {}
    for sample_id, rows in predictions.items():
        sample = samples[sample_id]
        turns = [t.dia_id for s in conversation_only(sample).sessions for t in s.turns]
        if method == "icl":
            if tokenizer is None:
                tokenizer = Tokenizer.from_dir(resolve_checkpoint(results["model"]["name"]))
            kept = icl_context(sample, tokenizer, settings["context_tokens"]).turns_kept  # the last `kept` turns
            held = set(turns[len(turns) - kept:]) if kept else set()
            out[sample_id] = [held] * len(rows)
        elif method in ("rag", "lora+rag"):
            hits = [r.get("retrieved") for r in rows]  # what the run put into each prompt, recorded per prediction
            if any(h is None for h in hits):
                raise SystemExit(f"error: {run_dir}/predictions.jsonl: rows of {sample_id} have no 'retrieved' field")
            if settings["rag_unit"] == "turn":
                out[sample_id] = [{turns[i] for i in h} for h in hits]
            else:  # a retrieved session holds all its turns
                sessions = [[t.dia_id for t in s.turns] for s in conversation_only(sample).sessions]
                out[sample_id] = [{d for i in h for d in sessions[i]} for h in hits]
        elif method == "lora" and settings.get("answer_mode") == "recite":
            recitations = [r.get("recitation") for r in rows]
            if any(r is None for r in recitations):
                raise SystemExit(f"error: {run_dir}/predictions.jsonl: rows of {sample_id} have no 'recitation' field")
            counts = {t.dia_id: stem_counts(t.text) for s in conversation_only(sample).sessions for t in s.turns}
            out[sample_id] = [recited_turn(r, counts) for r in recitations]
        else:
            raise SystemExit(f"error: {run_dir}: method {method!r} puts no conversation in the prompt")
    return out


def question_keys(rows: list[dict]) -> list[tuple]:
    """(question, answer, n-th occurrence): identifies a question within its conversation across runs."""
    seen: dict[tuple, int] = defaultdict(int)
    keys = []
    for r in rows:
        k = (r["question"], str(r["answer"]))
        keys.append(k + (seen[k],))
        seen[k] += 1
    return keys


def f1_by_question(run_dir: Path) -> dict[tuple, float]:
    """A run's F1 per (sample_id, question key), to look up the same questions in another run."""
    return {(sid, k): r["f1"] for sid, rows in read_predictions(run_dir).items()
            for k, r in zip(question_keys(rows), rows)}


def coverage(run_dir: Path, samples: dict, compare_f1: dict[str, dict[tuple, float]],
             conversations: list[str] | None = None) -> dict:
    """``conversations``: only these of the run (e.g. the dev split, to sit beside a dev run)."""
    results, _ = load_run(run_dir)
    predictions = read_predictions(run_dir)
    if conversations is not None:
        predictions = {sid: rows for sid, rows in predictions.items() if sid in conversations}
    contexts = contexts_of_run(run_dir, results, predictions, samples)
    stats = {s: {"n": 0, "f1": 0.0, **{label: 0.0 for label in compare_f1}} for s in SPLITS}
    by_category = {s: defaultdict(int) for s in SPLITS}
    for sid, rows in predictions.items():
        qa = {(q.question, str(q.answer)): q for q in select_questions(samples[sid], with_adversarial=True)}
        for key, row, held in zip(question_keys(rows), rows, contexts[sid]):
            q = qa.get(key[:2])
            if q is None:
                raise SystemExit(f"error: {run_dir}/predictions.jsonl: question {row['question']!r} of {sid} is "
                                 "not in the data file")
            split = split_of(evidence_ids(q.evidence), held)
            stats[split]["n"] += 1
            stats[split]["f1"] += row["f1"]
            by_category[split][q.category] += 1
            for label in compare_f1:
                if (sid, key) not in compare_f1[label]:
                    raise SystemExit(f"error: --compare {label}: no prediction for {row['question']!r} of {sid}")
                stats[split][label] += compare_f1[label][(sid, key)]
    for split, s in stats.items():
        n = s["n"]
        for k in ["f1", *compare_f1]:
            s[k] = 100 * s[k] / n if n else None
        s["categories"] = dict(sorted(by_category[split].items()))
    total = sum(s["n"] for s in stats.values())
    return {"run": str(run_dir), "method": results["method"], "settings": {k: results["settings"].get(k) for k in
            ("method", "context_tokens", "top_k", "rag_unit", "answer_mode")}, "questions": total,
            "evidence_all_in_prompt": stats["all"]["n"] / total if total else None, "splits": stats}


def render(reports: list[dict], compare: list[tuple[str, Path]]) -> str:
    head = "| Method | evidence in prompt | questions | share | F1 |" + "".join(f" F1 of {c} |" for c, _ in compare)
    lines = [head, "|" + "---|" * (5 + len(compare))]
    for rep in reports:
        for split in SPLITS:
            s = rep["splits"][split]
            if not s["n"]:
                continue
            cells = [rep["method"], split, str(s["n"]), f"{100 * s['n'] / rep['questions']:.1f}%", f"{s['f1']:.2f}"]
            cells += [f"{s[c]:.2f}" for c, _ in compare]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "F1: mean token F1 of the split's questions (LoCoMo scoring), not the average of category means."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = Parser(prog="python -m bench.analysis.context_coverage", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="finished icl / rag / lora+rag / recite run directories")
    ap.add_argument("--compare", action="append", default=[], metavar="RUN_DIR",
                    help="a finished run (e.g. base) whose F1 on the same questions is shown beside; repeatable")
    ap.add_argument("--data", help="locomo10.json (else $LOCOMO_DATA, the cache, or a download)")
    ap.add_argument("--conversations", type=id_list, default=None,
                    help="only these conversations of each run (comma-separated), e.g. conv-26,conv-30")
    ap.add_argument("--out", help="output prefix: writes <out>.json and <out>.md")
    args = ap.parse_args(argv)
    conversations = args.conversations.split(",") if args.conversations else None
    runs = [Path(r) for r in args.runs]
    for r in runs + [Path(c) for c in args.compare]:
        if not (r / "results.json").is_file() or not (r / "predictions.jsonl").is_file():
            raise SystemExit(f"error: {r}: no results.json / predictions.jsonl (is the run finished?)")
    samples = {s.sample_id: s for s in load_locomo(resolve_data_path(args.data))}
    compare = [(load_run(Path(c))[0]["method"], Path(c)) for c in args.compare]
    compare_f1 = {label: f1_by_question(cdir) for label, cdir in compare}  # read once, used for every run
    reports = [coverage(r, samples, compare_f1, conversations) for r in runs]
    md = render(reports, compare)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out.with_suffix(".json"), {"runs": reports, "compare": [str(c) for _, c in compare]})
        atomic_write_text(out.with_suffix(".md"), md)
    print(md, end="")
    return md


if __name__ == "__main__":
    main()
