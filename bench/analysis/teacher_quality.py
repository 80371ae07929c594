"""How good is the distill recipe's teacher? Its answers beside the rule-made answers of the same queries.

The distill recipe trains the adapter to match the base model *holding the session in context* (the teacher) on
the coverage queries. That can only store what the teacher says. This compares, for every query of the given
conversations, the teacher's greedy answer (from the teacher cache the runs fill, computed if absent) with the
answer `queries.coverage_queries` wrote from the turn itself: token F1 (LoCoMo's scoring), exact match, length in
words, and for "When ..." queries whether the teacher gave the turn's date. Nothing here reads LoCoMo's questions
or answers.

    python -m bench.analysis.teacher_quality --conversations conv-26,conv-30 \\
        --out bench/results/locomo/teacher_quality_dev
"""

from __future__ import annotations

from pathlib import Path

from bench.common import atomic_write_json, atomic_write_text, run_info
from bench.locomo_data import DEV_SPLIT, load_locomo, resolve_data_path
from bench.locomo_score import normalize_answer, token_f1
from lora_mem.cli import Parser, id_list, positive_int
from lora_mem.lora_core.conversation import conversation_only
from lora_mem.lora_core.distill import DistillSettings, teacher_examples
from lora_mem.lora_core.memory import QUESTION_TEMPLATE
from lora_mem.lora_core.recipes import Recipe, recipe_queries
from lora_mem.model.loader import load_model


def compare(teacher: list[str], reference: list[str], questions: list[str]) -> dict:
    """Per-query agreement of the teacher's answers with the rule-made ones (x100 where a rate)."""
    n = len(teacher)
    when = [i for i, q in enumerate(questions) if q.startswith("When ")]
    return {"queries": n,
            "f1": 100 * sum(token_f1(t, r) for t, r in zip(teacher, reference)) / n if n else None,
            "exact": 100 * sum(normalize_answer(t) == normalize_answer(r) for t, r in zip(teacher, reference)) / n
            if n else None,
            "teacher_words": sum(len(t.split()) for t in teacher) / n if n else None,
            "reference_words": sum(len(r.split()) for r in reference) / n if n else None,
            "when_queries": len(when),
            "when_date_given": 100 * sum(normalize_answer(reference[i]) in normalize_answer(teacher[i])
                                         for i in when) / len(when) if when else None}


def main(argv: list[str] | None = None) -> dict:
    ap = Parser(prog="python -m bench.analysis.teacher_quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="a LoCoMo-layout file (else $LOCOMO_DATA, the cache, or a download)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="packaged name, local checkpoint dir or hub id")
    ap.add_argument("--conversations", type=id_list, default=",".join(DEV_SPLIT), help="comma-separated sample ids")
    ap.add_argument("--queries-per-turn", type=positive_int, default=Recipe().queries_per_turn,
                    help="facts asked about per turn")
    ap.add_argument("--query-phrasings", type=positive_int, default=Recipe().query_phrasings,
                    help="phrasings of each fact")
    ap.add_argument("--examples", type=positive_int, default=8, help="queries shown per conversation in the .md")
    ap.add_argument("--out", help="output prefix: writes <out>.json and <out>.md")
    args = ap.parse_args(argv)
    args.conversations = args.conversations.split(",")
    samples = {s.sample_id: s for s in load_locomo(resolve_data_path(args.data))}
    missing = [c for c in args.conversations if c not in samples]
    if missing:
        ap.error(f"--conversations: not in the data file: {', '.join(missing)}")
    lm = load_model(args.model)
    recipe = Recipe("text+distill", queries_per_turn=args.queries_per_turn, query_phrasings=args.query_phrasings)
    settings = DistillSettings(recipe.distill_top_k, recipe.distill_temperature, "teacher")
    per_conv, all_t, all_r, all_q, shown = {}, [], [], [], []
    for sid in args.conversations:
        conv = conversation_only(samples[sid])
        queries = recipe_queries(conv, recipe)
        examples = {e.question: e for e in teacher_examples(lm, conv, queries, settings, QUESTION_TEMPLATE)}
        kept = [q for q in queries if q.question in examples]
        teacher = [lm.tokenizer.decode(examples[q.question].answer_ids) for q in kept]
        reference = [q.answer for q in kept]
        per_conv[sid] = compare(teacher, reference, [q.question for q in kept])
        all_t += teacher
        all_r += reference
        all_q += [q.question for q in kept]
        shown += [(sid, q.question, r, t) for q, r, t in list(zip(kept, reference, teacher))[:args.examples]]
    result = {**run_info(lm.model.lm_head.weight.device), "model": args.model,
              "queries_per_turn": args.queries_per_turn, "query_phrasings": args.query_phrasings,
              "distill_settings": settings.__dict__,
              "all": compare(all_t, all_r, all_q), "conversations": per_conv}
    a = result["all"]
    md = [f"Teacher ({args.model}, the session in context) against the rule-made answers of the same "
          f"{a['queries']} coverage queries ({', '.join(args.conversations)}):", "",
          "| queries | token F1 | exact | words (teacher) | words (rule) | 'When' queries | date given |",
          "|---|---|---|---|---|---|---|",
          f"| {a['queries']} | {a['f1']:.1f} | {a['exact']:.1f}% | {a['teacher_words']:.1f} | "
          f"{a['reference_words']:.1f} | {a['when_queries']} | "
          + (f"{a['when_date_given']:.1f}% |" if a["when_date_given"] is not None else "- |"), "",
          "| conversation | query | rule-made answer | teacher |", "|---|---|---|---|"]
    md += [f"| {sid} | {q} | {r} | {t.replace('|', '/')} |" for sid, q, r, t in shown]
    text = "\n".join(md) + "\n"
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out.with_suffix(".json"), result)
        atomic_write_text(out.with_suffix(".md"), text)
    return result


if __name__ == "__main__":
    main()
