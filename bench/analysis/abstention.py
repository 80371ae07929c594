"""Does an adapter abstain where it should? Abstention rates by category, and what the declined questions were.

    python -m bench.analysis.abstention bench/results/locomo/smollm2-r8-qa1-cabst \
        --compare bench/results/locomo/smollm2-r8-qa1 --out bench/results/locomo/abstention

Category 5 (adversarial) rewards "Not mentioned ..." (`bench.locomo_score.is_abstention`); on categories 1-4 an
abstention scores 0. An adapter that knows what the conversation does not say abstains more on category 5 than
on 1-4; one that has learnt to abstain at some rate, whatever it is asked, abstains alike on both. Per run: the
share of each category's questions it declined, and the ratio of its category-5 rate to its rate on 1-4 (1.0: no
discrimination). `--compare RUN` (a run without abstention training, asked the same questions) adds that run's
F1 on the answerable questions this one declined and on those it answered: if the declined ones are those the
other run got wrong, abstention picked the questions the adapter did not know. Reads predictions.jsonl; writes
<out>.md and <out>.json.
"""

from __future__ import annotations

from pathlib import Path

from bench.analysis.report import load_run
from bench.common import atomic_write_json, atomic_write_text, read_jsonl
from bench.locomo_score import TABLE_CATEGORIES, declined_percent, is_abstention
from lora_mem.cli import Parser

CATEGORY_NAMES = dict(TABLE_CATEGORIES) | {5: "Adversarial"}  # the results table's order, then category 5


def abstention_rates(rows: list[dict]) -> dict:
    """Percent of each category's questions declined, of categories 1-4 together, and the category-5 to 1-4 ratio."""
    out: dict = {"by_category": {}}
    for cat, name in CATEGORY_NAMES.items():
        rs = [r for r in rows if int(r["category"]) == cat]
        if rs:
            out["by_category"][name] = {"n": len(rs), "declined_pct": declined_percent(rs)}
    answerable = [r for r in rows if int(r["category"]) != 5]
    out["answerable_n"] = len(answerable)
    out["answerable_declined_pct"] = declined_percent(answerable)
    adversarial = out["by_category"].get("Adversarial")
    rate = out["answerable_declined_pct"]
    out["adversarial_to_answerable_ratio"] = (adversarial["declined_pct"] / rate
                                              if adversarial and rate else None)
    return out


def compare_on_declined(rows: list[dict], other: list[dict]) -> dict:
    """The other run's F1 (x100) on the answerable questions `rows` declined and on those it answered."""
    other_f1 = {(r["sample_id"], r["question"]): r["f1"] for r in other if int(r["category"]) != 5}
    split: dict[str, list[float]] = {"declined": [], "answered": []}
    for r in rows:
        if int(r["category"]) == 5:
            continue
        key = (r["sample_id"], r["question"])
        if key not in other_f1:
            raise SystemExit(f"error: the compared run has no prediction for {r['sample_id']}: {r['question']!r}")
        split["declined" if is_abstention(r["prediction"]) else "answered"].append(other_f1[key])
    return {f"{k}_n": len(v) for k, v in split.items()} | {
        f"other_f1_on_{k}": (100.0 * sum(v) / len(v) if v else None) for k, v in split.items()}


def _fmt(v: float | None) -> str:
    return f"{v:.2f}" if v is not None else "-"


def render(results: list[dict]) -> str:
    names = list(CATEGORY_NAMES.values())
    lines = ["Declined (\"Not mentioned ...\"), % of each category's questions; ratio = category 5 rate / 1-4 rate "
             "(1.0: no discrimination)", "",
             "| Method | " + " | ".join(names) + " | 1-4 | ratio |", "|---" * (len(names) + 3) + "|"]
    for r in results:
        rates = r["rates"]
        cells = [f"{rates['by_category'][n]['declined_pct']:.1f}" if n in rates["by_category"] else "-" for n in names]
        lines.append(f"| {r['method']} | " + " | ".join(cells) +
                     f" | {rates['answerable_declined_pct']:.1f} | {_fmt(rates['adversarial_to_answerable_ratio'])} |")
    compared = [r for r in results if "compare" in r]
    if compared:
        lines += ["", "F1 (x100) of the compared run on the answerable questions each run declined / answered", "",
                  "| Method | compared with | declined (n) | its F1 there | answered (n) | its F1 there |",
                  "|---|---|---|---|---|---|"]
        for r in compared:
            c = r["compare"]
            lines.append(f"| {r['method']} | {c['method']} | {c['declined_n']} | {_fmt(c['other_f1_on_declined'])} | "
                         f"{c['answered_n']} | {_fmt(c['other_f1_on_answered'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = Parser(prog="python -m bench.analysis.abstention", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="bench.locomo run directories (or their results.json)")
    ap.add_argument("--compare", default=None, help="a run asked the same questions, without abstention training")
    ap.add_argument("--out", default=None, help="output prefix: writes <out>.md and <out>.json")
    args = ap.parse_args(argv)
    other = None
    if args.compare:
        other_results, other_dir = load_run(Path(args.compare))
        other = (other_results["method"], read_jsonl(other_dir / "predictions.jsonl"))
    results = []
    for path in args.runs:
        run, run_dir = load_run(Path(path))
        rows = read_jsonl(run_dir / "predictions.jsonl")
        entry = {"run": str(path), "method": run["method"], "rates": abstention_rates(rows)}
        if other is not None:
            entry["compare"] = {"run": args.compare, "method": other[0], **compare_on_declined(rows, other[1])}
        results.append(entry)
    md = render(results)
    print(md)
    if args.out:
        out = Path(args.out)
        atomic_write_text(out.with_name(out.name + ".md"), md)
        atomic_write_json(out.with_name(out.name + ".json"), {"runs": results})
    return results


if __name__ == "__main__":
    main()
