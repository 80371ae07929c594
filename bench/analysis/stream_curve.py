"""Streaming runs side by side: F1 over sessions written, one line per strategy, and what each forgets.

    python -m bench.analysis.stream_curve runs/stream-dev/continue runs/stream-dev/modules ... \
        --out bench/results/stream/dev/curve

Each argument is a bench.stream run directory (or its results.json). Writes <out>.json (each run's curve,
forgetting, final scores and cost), <out>.md (the same as a table) and <out>.png (needs matplotlib): left, the Avg F1
of the questions askable after n sessions (the last point: every question, after each conversation's last session;
the all-at-once write of the first run's --reference as a dashed line); right, the mean F1 of the questions about
the first quarter of the sessions, right after it was written and at every later checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from bench.analysis.report import load_run
from bench.common import atomic_write_json, atomic_write_text
from lora_mem.cli import Parser


def summary(results: dict, path: str) -> dict:
    cost = results["cost"]
    return {"run": path, "method": results["method"], "git_commit": results.get("git_commit"),
            "device": results.get("device"), "strategy": results["strategy"],
            "curve": [{"sessions_written": p["sessions_written"], "asked": p["asked"], "avg_f1": p["f1"]["avg_f1"]}
                      for p in results["curve"]],
            "forgetting": results["forgetting"],
            "final_avg_f1": results["final"]["f1"]["avg_f1"],
            "final_question_specific": results["final"]["question_specific"]["avg"]["question_specific"],
            "final_over_all_at_once": results.get("final_over_all_at_once"),
            "train_tokens": cost["train_tokens"], "train_seconds": cost["train_seconds"],
            "append_seconds_median": cost["append_seconds_median"], "append_seconds_max": cost["append_seconds_max"],
            "appends_of_25_to_35_turns": cost["appends_of_25_to_35_turns"],
            "train_tokens_over_all_at_once": cost.get("train_tokens_over_all_at_once")}


def reference_of(results: dict) -> dict | None:
    ref = results.get("all_at_once")
    if not ref:
        return None
    return {"run": ref["run"], "method": ref["method"], "git_commit": ref["git_commit"],
            "avg_f1": ref["f1"]["avg_f1"], "question_specific": ref["question_specific"]["avg"]["question_specific"],
            "train_tokens": results["cost"]["all_at_once"]["train_tokens"]}


def _num(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def render(runs: list[dict], reference: dict | None) -> str:
    lines = ["| Strategy | final Avg F1 | question-specific | vs all at once (q-specific) | first quarter: "
             "written -> final | forgetting ratio | training tokens (x all at once) | append, median s | "
             "25-35-turn appends, median s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        points = {p["sessions_written"]: p["f1"] for p in r["forgetting"]["points"]}
        ratio = (r["final_over_all_at_once"] or {}).get("question_specific")
        lines.append(f"| {r['strategy']} | {_num(r['final_avg_f1'])} | {_num(r['final_question_specific'])} | "
                     f"{_num(ratio, 3)} | {_num(points.get('written'))} -> {_num(points.get('final'))} | "
                     f"{_num(r['forgetting']['final_over_written'], 3)} | {r['train_tokens']:,} "
                     f"({_num(r['train_tokens_over_all_at_once'])}) | {_num(r['append_seconds_median'], 1)} | "
                     f"{_num(r['appends_of_25_to_35_turns']['seconds_median'], 1)} |")
    lines += ["", f"Recipe: {runs[0]['method'].split(') of ', 1)[-1]}"]
    if reference:
        lines += ["", f"All at once ({reference['method']}, {reference['run']}, code {reference['git_commit']}): "
                  f"Avg F1 {_num(reference['avg_f1'])}, question-specific {_num(reference['question_specific'])}, "
                  f"{reference['train_tokens']:,} training tokens."]
    sessions = sorted({p["sessions_written"] for r in runs for p in r["curve"]} - {"final"}) + ["final"]
    lines += ["", "Avg F1 of the questions askable after n sessions:", "",
              "| Strategy | " + " | ".join(str(s) for s in sessions) + " |", "|---|" + "---|" * len(sessions)]
    for r in runs:
        at = {p["sessions_written"]: p["avg_f1"] for p in r["curve"]}
        lines.append(f"| {r['strategy']} | " + " | ".join(_num(at.get(s)) for s in sessions) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], reference: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    numbered = sorted({p["sessions_written"] for r in runs for p in r["curve"]} - {"final"})
    final_x = (numbered[-1] if numbered else 0) + 4
    for r in runs:
        xs = [final_x if p["sessions_written"] == "final" else p["sessions_written"] for p in r["curve"]]
        left.plot(xs, [p["avg_f1"] for p in r["curve"]], marker="o", label=r["strategy"])
        fpoints = r["forgetting"]["points"]
        right.plot(range(len(fpoints)), [p["f1"] for p in fpoints], marker="o", label=r["strategy"])
    if reference:
        left.axhline(reference["avg_f1"], color="gray", linestyle="--", label="all at once (final)")
    left.set_xticks(numbered + [final_x], [str(n) for n in numbered] + ["final"])
    left.set_xlabel("sessions written")
    left.set_ylabel("Avg F1 of the questions askable")
    left.set_title("F1 as the memory grows")
    labels = [str(p["sessions_written"]) for p in runs[0]["forgetting"]["points"]]
    right.set_xticks(range(len(labels)), labels)
    right.set_xlabel("checkpoint (written = right after the first quarter)")
    right.set_ylabel("F1 on first-quarter questions")
    right.set_title("Forgetting")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = Parser(prog="python -m bench.analysis.stream_curve", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="bench.stream run directories (or their results.json)")
    ap.add_argument("--out", required=True, help="output prefix: writes <out>.json, <out>.md and <out>.png")
    args = ap.parse_args(argv)
    loaded = [load_run(Path(p))[0] for p in args.runs]
    unfinished = [p for p, r in zip(args.runs, loaded) if r.get("failed") or "final" not in r]
    if unfinished:
        ap.error(f"{unfinished[0]}: not a finished bench.stream run")
    runs = [summary(r, p) for r, p in zip(loaded, args.runs)]
    reference = reference_of(loaded[0])
    out = Path(args.out)
    md = render(runs, reference)
    print(md)
    atomic_write_json(out.with_name(out.name + ".json"), {"runs": runs, "all_at_once": reference})
    atomic_write_text(out.with_name(out.name + ".md"), md)
    plot(runs, reference, out.with_name(out.name + ".png"))
    return {"runs": runs, "all_at_once": reference}


if __name__ == "__main__":
    main()
