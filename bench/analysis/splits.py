"""Runs compared on the dev split (where recipes are chosen), the test split (the other conversations) and all.

    python -m bench.analysis.splits bench/results/locomo/smollm2-rag bench/results/locomo/smollm2-r8-qa1 \
        --out bench/results/locomo/splits

Per run and split: Avg F1 (mean of the four category F1s, categories 1-4), each category's F1, the
question-specific Avg F1 of `shuffle_control` (F1 less what a prediction scores against another question of the
same conversation and category), and the cost the run recorded for those conversations (training tokens and
seconds, the teacher's seconds where there is one). A run that holds only some conversations (a dev run) is
reported on the splits it covers. Writes <out>.md and <out>.json.
"""

from __future__ import annotations

from pathlib import Path

from bench.analysis.report import load_run
from bench.analysis.shuffle_control import control
from bench.common import atomic_write_json, atomic_write_text, read_jsonl
from bench.locomo_data import DEV_SPLIT
from bench.locomo_score import TABLE_CATEGORIES, aggregate
from lora_mem.cli import Parser, positive_int

SPLITS = ("dev", "test", "all")


def in_split(sample_id: str, split: str) -> bool:
    return split == "all" or (sample_id in DEV_SPLIT) == (split == "dev")


def split_report(results: dict, rows: list[dict], split: str, seeds: int) -> dict | None:
    rows = [r for r in rows if r["category"] != 5 and in_split(r["sample_id"], split)]
    convs = [c for c in results.get("conversations", []) if in_split(c["sample_id"], split)]
    if not rows:
        return None
    scores = aggregate(rows)
    qs = control(rows, seeds)
    return {"conversations": sorted({r["sample_id"] for r in rows}), "questions": len(rows),
            "avg_f1": scores["avg_f1"], "categories": {name: scores.get(name) for _, name in TABLE_CATEGORIES},
            "question_specific": {name: qs[name]["question_specific"] for name in qs},
            "train_tokens": sum(c.get("train_tokens", 0) for c in convs),
            "train_seconds": sum(c.get("train_seconds", 0.0) for c in convs),
            "teacher_seconds": sum(c.get("teacher_seconds", 0.0) for c in convs),
            "answer_seconds": sum(c.get("answer_seconds", 0.0) for c in convs)}


def render(reports: list[dict]) -> str:
    names = [name for _, name in TABLE_CATEGORIES]
    lines = []
    for split in SPLITS:
        rows = [(r["method"], r["splits"][split]) for r in reports if r["splits"].get(split)]
        if not rows:
            continue
        label = {"dev": f"dev ({', '.join(DEV_SPLIT)}): where recipes are chosen",
                 "test": "test (the other conversations)", "all": "all conversations"}[split]
        lines += [f"### {label}", "",
                  "| Method | questions | Avg F1 | " + " | ".join(names) + " | question-specific Avg F1 | "
                  "Temporal q-specific | train tokens | train s | teacher s |",
                  "|---|" + "---|" * (len(names) + 7)]
        for method, s in rows:
            cats = " | ".join("-" if s["categories"][n] is None else f"{s['categories'][n]:.2f}" for n in names)
            q = s["question_specific"]
            lines.append(f"| {method} | {s['questions']} | {s['avg_f1']:.2f} | {cats} | {q['avg']:.2f} | "
                         f"{q.get('Temporal', float('nan')):.2f} | {s['train_tokens']:,} | {s['train_seconds']:.0f} | "
                         f"{s['teacher_seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


# Settings that say where or how fast a run ran, not what it measured: never used to tell two labels apart. The
# dtype does tell them apart (bf16 changes the numbers); main() puts the one the run computed in into its settings.
NOT_RECIPE = {"conversations", "data_sha256", "device", "device_type", "threads", "kernel_policy",
              "adapters_from", "shared_batches", "max_questions", "answer_memory_mb"}


def _shared(labels: list[str]) -> list[list[int]]:
    """The indices of each label that more than one run has."""
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def distinct_labels(labels: list[str], settings: list[dict], commits: list[str | None] | None = None) -> list[str]:
    """Runs that share a method label get the settings that tell them apart appended, e.g. "[query_phrasings=3]";
    runs still alike, the code that ran them ("[code 7047ae1]"). A setting a run does not record (None: its code
    predates the option, so it ran as the option's default) tells nothing apart."""
    out = list(labels)
    for group in _shared(labels):
        keys = sorted({k for i in group for k in settings[i]} - NOT_RECIPE)
        differ = [k for k in keys if len({repr(settings[i][k]) for i in group if settings[i].get(k) is not None}) > 1]
        for i in group:
            if differ:
                out[i] = f"{out[i]} [{', '.join(f'{k}={settings[i].get(k)}' for k in differ)}]"
    commits = commits or [None] * len(labels)
    for group in _shared(out):
        if len({commits[i] for i in group}) > 1:
            for i in group:
                out[i] = f"{out[i]} [code {(commits[i] or 'unknown')[:7]}]"
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = Parser(prog="python -m bench.analysis.splits", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="bench.locomo run directories (or their results.json)")
    ap.add_argument("--seeds", type=positive_int, default=10, help="shuffles averaged by the control")
    ap.add_argument("--out", default=None, help="output prefix: writes <out>.md and <out>.json")
    args = ap.parse_args(argv)
    reports, settings, commits = [], [], []
    for path in args.runs:
        results, run_dir = load_run(Path(path))
        rows = read_jsonl(run_dir / "predictions.jsonl")
        run_settings = results.get("settings", {})
        settings.append({**run_settings, "dtype": results.get("dtype") or run_settings.get("dtype")})
        commits.append(results.get("git_commit"))
        reports.append({"run": str(path), "method": results["method"],
                        "splits": {s: split_report(results, rows, s, args.seeds) for s in SPLITS}})
    for report, label in zip(reports, distinct_labels([r["method"] for r in reports], settings, commits)):
        report["method"] = label
    md = render(reports)
    print(md)
    if args.out:
        out = Path(args.out)
        atomic_write_text(out.with_name(out.name + ".md"), md)
        atomic_write_json(out.with_name(out.name + ".json"), {"dev_split": list(DEV_SPLIT), "seeds": args.seeds,
                                                               "runs": reports})
    return reports


if __name__ == "__main__":
    main()
