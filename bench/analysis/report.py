"""Combine LoCoMo runs into one table (markdown) and plots (PNG, needs matplotlib).

    python -m bench.analysis.report runs/locomo-base runs/locomo-r8 --published --out bench/results/locomo/report

Each argument is a run directory of `bench.locomo` (or its results.json). `--published` adds the
experiment's published rows (Qwen2.5-1.5B-Instruct, from the mission) for side-by-side reading.
Writes <out>.md (table with model, device, wall and compute time) and, unless --no-plot (matplotlib: the plot
extra), <out>_f1.png (F1 by category and method) and <out>_loss.png (training loss curves).
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import atomic_write_text, read_jsonl
from bench.locomo_score import declined_percent, format_table
from lora_mem.cli import Parser

# The experiment's table (Qwen2.5-1.5B-Instruct, LoCoMo categories 1-4), as published.
PUBLISHED = [
    ("Published: Base (no context), Qwen2.5-1.5B", {"SingleHop": 8.56, "MultiHop": 5.50, "OpenDom": 9.67, "Temporal": 3.03, "avg_f1": 6.69}),
    ("Published: LoRA-Mem (r=4), Qwen2.5-1.5B", {"SingleHop": 9.16, "MultiHop": 6.72, "OpenDom": 8.87, "Temporal": 2.30, "avg_f1": 6.76}),
    ("Published: LoRA-Mem (r=8), Qwen2.5-1.5B", {"SingleHop": 10.44, "MultiHop": 7.05, "OpenDom": 8.64, "Temporal": 2.54, "avg_f1": 7.17}),
]
CATEGORY_KEYS = ["SingleHop", "MultiHop", "OpenDom", "Temporal"]


def load_run(path: Path) -> tuple[dict, Path]:
    path = Path(path)
    results_file = path / "results.json" if path.is_dir() else path
    if not results_file.is_file():
        raise SystemExit(f"error: {results_file}: no results.json (is the run finished?)")
    return json.loads(results_file.read_text()), results_file.parent


def loss_curves(run_dir: Path) -> dict[str, list[float]]:
    """Per-conversation losses: a run directory's conversations/<id>/train.json, or loss/<id>.json where a run's
    results were copied for committing (bench/results/locomo/<name>/)."""
    curves = {}
    for train in sorted((run_dir / "conversations").glob("*/train.json")):
        curves[train.parent.name] = json.loads(train.read_text())["losses"]
    for train in sorted((run_dir / "loss").glob("*.json")):
        curves.setdefault(train.stem, json.loads(train.read_text())["losses"])
    return curves


def abstained_answerable(run_dir: Path) -> float | None:
    """Percent of the answerable questions (categories 1-4) a run declined ("Not mentioned ..."), from its
    predictions.jsonl; None if the run directory has none. Category 5 rewards abstaining; here it costs F1."""
    path = run_dir / "predictions.jsonl"
    if not path.is_file():
        return None
    return declined_percent(r for r in read_jsonl(path) if int(r["category"]) != 5)


def render_markdown(runs: list[tuple[dict, Path]], published: bool) -> str:
    rows = [(r["method"] + f" ({r['model']['name']})", r["scores"]) for r, _ in runs]
    table = format_table(rows + (PUBLISHED if published else []))
    lines = [table, "", "| Method | model | device | questions | overall F1 | adversarial acc (n) "
             "| abstains on 1-4 (%) | prompt tokens mean (max) | train tok/s | answer q/s | compute s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, run_dir in runs:
        tps = r.get("train_tokens_per_second")
        qps = r.get("answer_questions_per_second")
        mean, top = r.get("prompt_tokens_mean"), r.get("prompt_tokens_max")  # absent in runs made before it was recorded
        adv = r["scores"].get("adversarial_acc")  # category 5, only in runs asked with --with-adversarial
        adv_cell = f"{adv:.2f} ({r['scores']['adversarial_n']})" if adv is not None else "-"
        declined = abstained_answerable(run_dir)
        lines.append(
            f"| {r['method']} | {r['model']['name']} | {r['device']} | {r['scores']['n']} | "
            f"{r['scores']['overall_f1']:.2f} | {adv_cell} | {f'{declined:.1f}' if declined is not None else '-'} | "
            f"{f'{mean:.0f} ({top})' if mean is not None else '-'} | "
            f"{f'{tps:.0f}' if tps else '-'} | {f'{qps:.2f}' if qps else '-'} | {r['compute_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[tuple[dict, Path]], published: bool, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    series = [(r["method"], r["scores"]) for r, _ in runs] + (PUBLISHED if published else [])
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(series)
    for i, (label, scores) in enumerate(series):
        xs = [j + i * width for j in range(len(CATEGORY_KEYS) + 1)]
        ys = [scores.get(k) or 0 for k in CATEGORY_KEYS] + [scores.get("avg_f1") or 0]
        ax.bar(xs, ys, width, label=label, hatch="//" if label.startswith("Published") else None)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(CATEGORY_KEYS) + 1)], CATEGORY_KEYS + ["Avg F1"])
    ax.set_ylabel("token F1")
    ax.set_title("LoCoMo: F1 by category and method")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, not over them
    fig.tight_layout()
    path = out.with_name(out.name + "_f1.png")
    fig.savefig(path, dpi=120)
    written.append(path)
    plt.close(fig)

    curves = [(r["method"], loss_curves(d)) for r, d in runs]
    curves = [(m, c) for m, c in curves if c]
    if curves:
        ncols = min(3, len(curves))  # a grid, so that many runs stay readable
        nrows = -(-len(curves) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.5 * nrows), squeeze=False)
        for ax in axes.flat[len(curves):]:
            ax.set_visible(False)
        for ax, (method, per_conv) in zip(axes.flat, curves):
            for sid, losses in per_conv.items():
                ax.plot(range(1, len(losses) + 1), losses, label=sid, linewidth=1)
            ax.set_title(f"{method}: training loss", fontsize=8)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("loss (mean over target tokens)")
            ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        path = out.with_name(out.name + "_loss.png")
        fig.savefig(path, dpi=120)
        written.append(path)
        plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> str:
    ap = Parser(prog="python -m bench.analysis.report", description="Combine bench.locomo runs into one table and plots.")
    ap.add_argument("runs", nargs="+", help="run directories (or results.json files)")
    ap.add_argument("--published", action="store_true", help="add the experiment's published rows")
    ap.add_argument("--out", default=None, help="output path prefix (writes <out>.md and <out>_*.png)")
    ap.add_argument("--no-plot", action="store_true", help="with --out, write no .png (the plots need matplotlib)")
    args = ap.parse_args(argv)
    if args.out and not args.no_plot:
        ap.require("matplotlib", extra="plot", needed_for="the plots of --out (or --no-plot)")
    runs = [load_run(Path(p)) for p in args.runs]
    md = render_markdown(runs, args.published)
    print(md)
    if args.out:
        out = Path(args.out)
        atomic_write_text(out.with_name(out.name + ".md"), md)
        for p in [] if args.no_plot else plot(runs, args.published, out):
            print(f"wrote {p}")
    return md


if __name__ == "__main__":
    main()
