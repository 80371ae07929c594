"""How much of what LoCoMo asks the training questions of a recipe cover (an analysis: the annotations it reads,
LoCoMo's questions, answers and evidence, never reach training).

For each LoCoMo question (categories 1-4) its key words are its content words' Porter stems, less the speakers'
names, question words and auxiliaries. Against each set of training questions built from the same conversation:

- all_key_words: some training question holds every key word of the LoCoMo question;
- half_key_words: some training question holds at least half of them;
- answer_f1: LoCoMo's F1 of the best-matching training question's answer against the gold answer (most key words
  shared; on a tie, one that opens with the same question word, then the first): what an adapter that stored its
  training answers perfectly would score by this lookup, a ceiling the recipe's data sets;
- answer_coverage: some training answer scores F1 >= 0.5 against the gold, whatever its question: whether the
  answer is in the set at all;
- from_evidence: the best-matching training question was built from one of the question's evidence turns
  (sets that record their turn only).

    python -m bench.analysis.query_coverage --out bench/results/locomo/query_coverage
"""

from __future__ import annotations

import re
from pathlib import Path

from nltk.stem import PorterStemmer

from bench.common import atomic_write_json, atomic_write_text
from bench.locomo_data import (
    CATEGORY_NAMES,
    iter_samples,
    load_locomo,
    resolve_data_path,
    select_questions,
)
from bench.locomo_score import score_qa
from lora_mem.cli import Parser, id_list
from lora_mem.lora_core.conversation import conversation_only
from lora_mem.lora_core.facts import fact_queries
from lora_mem.lora_core.queries import coverage_queries
from lora_mem.lora_core.recipes import template_qa

_stem = PorterStemmer().stem
_NOT_KEY = frozenset("""a an the and or but of to in on at for with from by is are was were be been being it its this
that these those he she they them his her their i me my we our you your what which who whom whose when where why how
did does do done has have had will would could should can may might must shall about as into than then so if not no
yes ever also just some any many much more most one kind type sort thing things""".split())


def key_stems(text: str, names: set[str]) -> set[str]:
    return {_stem(w) for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _NOT_KEY and w not in names}


def query_sets(conv) -> dict[str, list[tuple[str, str, str | None]]]:
    """(question, answer, dia_id or None) of each set of training questions, built from the conversation alone."""
    return {
        "templates (qa, every pair)": [(p.question, p.answer, None) for p in template_qa(conv)],
        "templates (qa, 1 per turn)": [(p.question, p.answer, None) for p in template_qa(conv, qa_per_turn=1)],
        "coverage queries (1 phrasing)": [(q.question, q.answer, q.dia_id) for q in coverage_queries(conv, phrasings=1)],
        "coverage queries (all phrasings)": [(q.question, q.answer, q.dia_id)
                                             for q in coverage_queries(conv, phrasings=3)],
        "parser facts (1 wording)": [(q.question, q.answer, q.dia_id) for q in fact_queries(conv, wordings=1)],
        "parser facts (all wordings)": [(q.question, q.answer, q.dia_id) for q in fact_queries(conv, wordings=3)],
    }


COVERED_F1 = 0.5  # a training answer this close to the gold counts as holding it


def question_word(text: str) -> str:
    words = re.findall(r"[a-z]+", text.lower())
    return words[0] if words else ""


def analyse(samples) -> dict:
    per_set: dict[str, dict] = {}
    for sample in samples:
        conv = conversation_only(sample)
        names = {w for s in (conv.speaker_a, conv.speaker_b) for w in re.findall(r"[a-z0-9]+", s.lower())}
        for name, queries in query_sets(conv).items():
            stats = per_set.setdefault(name, {"queries": 0, "rows": []})
            stats["queries"] += len(queries)
            keyed = [(key_stems(q, names), question_word(q), a, d) for q, a, d in queries]
            for qa in select_questions(sample):
                key, wh = key_stems(qa.question, names), question_word(qa.question)
                best, rank = None, (-1, False)
                for stems, word, answer, dia in keyed:
                    r = (len(key & stems), word == wh)
                    if r > rank:
                        best, rank = (answer, dia), r
                if not key or best is None:
                    continue
                shared = rank[0]
                covered = any(score_qa(a, qa.answer, qa.category) >= COVERED_F1 for _, _, a, _ in keyed)
                stats["rows"].append({
                    "category": qa.category, "all": shared == len(key), "half": shared >= len(key) / 2,
                    "f1": score_qa(best[0], qa.answer, qa.category), "covered": covered,
                    "evidence": None if best[1] is None else best[1] in qa.evidence})
    out = {}
    for name, stats in per_set.items():
        rows = stats["rows"]
        out[name] = {"training_questions": stats["queries"], "questions": len(rows),
                     **summary(rows),
                     "by_category": {CATEGORY_NAMES[c]: summary([r for r in rows if r["category"] == c])
                                     for c in (1, 2, 3, 4)}}
    return out


def summary(rows: list[dict]) -> dict:
    n = max(len(rows), 1)
    ev = [r["evidence"] for r in rows if r["evidence"] is not None]
    return {"all_key_words": 100 * sum(r["all"] for r in rows) / n,
            "half_key_words": 100 * sum(r["half"] for r in rows) / n,
            "answer_f1": 100 * sum(r["f1"] for r in rows) / n,
            "answer_coverage": 100 * sum(r["covered"] for r in rows) / n,
            "from_evidence": 100 * sum(ev) / len(ev) if ev else None}


def format_table(result: dict) -> str:
    lines = ["| training questions | per conversation | all key words % | half % | answer F1 (best match) | "
             "from an evidence turn % |", "|---|---|---|---|---|---|"]
    for name, r in result["sets"].items():
        ev = "-" if r["from_evidence"] is None else f"{r['from_evidence']:.1f}"
        lines.append(f"| {name} | {r['training_questions'] / result['conversations']:.0f} | {r['all_key_words']:.1f} | "
                     f"{r['half_key_words']:.1f} | {r['answer_f1']:.2f} | {ev} |")
    for metric, title in (("answer_f1", "Answer F1 of the best-matching training question (the lookup ceiling)"),
                          ("answer_coverage", f"Answer coverage: % of questions some training answer holds at "
                                              f"F1 >= {COVERED_F1}")):
        lines += ["", f"{title}, by category:", "",
                  "| training questions | " + " | ".join(CATEGORY_NAMES[c] for c in (1, 2, 3, 4)) + " |",
                  "|---|---|---|---|---|"]
        for name, r in result["sets"].items():
            cats = r["by_category"]
            lines.append(f"| {name} | " + " | ".join(f"{cats[CATEGORY_NAMES[c]][metric]:.2f}" for c in (1, 2, 3, 4))
                         + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = Parser(prog="python -m bench.analysis.query_coverage", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="a LoCoMo-layout JSON file (else $LOCOMO_DATA, ...)")
    ap.add_argument("--conversations", type=id_list, default=None, help="comma-separated sample ids (default: all)")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    data = resolve_data_path(args.data)
    samples = iter_samples(load_locomo(data), args.conversations)
    result = {"data": str(data), "conversations": len(samples), "sets": analyse(samples)}
    table = format_table(result)
    print(table)
    if args.out:
        atomic_write_json(Path(f"{args.out}.json"), result)
        atomic_write_text(Path(f"{args.out}.md"), table + "\n")
    return result


if __name__ == "__main__":
    main()
