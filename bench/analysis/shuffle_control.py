"""How much of a run's F1 answers the question asked? Score each prediction against another question's gold.

    python -m bench.analysis.shuffle_control bench/results/locomo/smollm2-rag bench/results/locomo/smollm2-r8-qa1 \
        --out bench/results/locomo/shuffle_control

Token F1 rewards an answer of the right shape: a model that answers every "When ...?" with some date of the
right year scores on temporal questions without knowing any of them. The control keeps every prediction but
shuffles which question it answers, among the questions of the same conversation and category, and scores it
against that question's gold (mean over `--seeds` shuffles). What survives the shuffle is what the answer's form
and the conversation's vocabulary earn; F1 - shuffled F1 is what depends on the question. Reads each run's
predictions.jsonl (committed runs under bench/results/locomo/ have it); writes <out>.md and <out>.json.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from bench.analysis.report import load_run
from bench.common import atomic_write_json, atomic_write_text, read_jsonl
from bench.locomo_score import TABLE_CATEGORIES, score_qa
from lora_mem.cli import Parser, positive_int


def shuffled_f1(rows: list[dict], seeds: int = 10) -> float:
    """Mean F1 (x100) of `rows` when each prediction is scored against the gold of a question drawn without
    replacement from the same conversation and category (a permutation per group), averaged over `seeds`."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["sample_id"], r["category"])].append(r)
    total = 0.0
    for seed in range(seeds):
        rng = random.Random(seed)
        for group in groups.values():
            golds = [r["answer"] for r in group]
            rng.shuffle(golds)
            total += sum(score_qa(r["prediction"], g, r["category"]) for r, g in zip(group, golds))
    return 100.0 * total / (seeds * len(rows)) if rows else float("nan")


def control(rows: list[dict], seeds: int = 10) -> dict:
    """Per category (names as in the results table) and on average: F1, shuffled F1, and their difference."""
    out = {}
    for cat, name in TABLE_CATEGORIES:
        rs = [r for r in rows if r["category"] == cat]
        if not rs:
            continue
        f1 = 100.0 * sum(r["f1"] for r in rs) / len(rs)
        sh = shuffled_f1(rs, seeds)
        out[name] = {"n": len(rs), "f1": f1, "shuffled_f1": sh, "question_specific": f1 - sh}
    if out:
        out["avg"] = {k: sum(v[k] for v in out.values()) / len(out) for k in ("f1", "shuffled_f1", "question_specific")}
    return out


def render(results: list[dict]) -> str:
    names = [name for _, name in TABLE_CATEGORIES] + ["avg"]
    lines = ["F1 / shuffled F1 / question-specific (F1 - shuffled), x100, categories 1-4; Avg as the results table "
             "(mean of categories)", "",
             "| Method | " + " | ".join(n if n != "avg" else "Avg" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for r in results:
        cells = []
        for n in names:
            c = r["control"].get(n)
            cells.append("-" if c is None else f"{c['f1']:.2f} / {c['shuffled_f1']:.2f} / **{c['question_specific']:.2f}**")
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = Parser(prog="python -m bench.analysis.shuffle_control", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="bench.locomo run directories (or their results.json)")
    ap.add_argument("--seeds", type=positive_int, default=10, help="shuffles averaged per run")
    ap.add_argument("--out", default=None, help="output prefix: writes <out>.md and <out>.json")
    args = ap.parse_args(argv)
    results = []
    for path in args.runs:
        res, run_dir = load_run(Path(path))
        preds = run_dir / "predictions.jsonl"
        if not preds.is_file():
            raise SystemExit(f"error: {preds}: no predictions.jsonl")
        rows = [r for r in read_jsonl(preds) if r["category"] != 5]
        results.append({"run": str(path), "method": res["method"], "control": control(rows, args.seeds)})
    md = render(results)
    print(md)
    if args.out:
        out = Path(args.out)
        atomic_write_text(out.with_name(out.name + ".md"), md)
        atomic_write_json(out.with_name(out.name + ".json"), {"seeds": args.seeds, "runs": results})
    return results


if __name__ == "__main__":
    main()
