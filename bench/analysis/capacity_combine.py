"""One table and one plot from several `bench.capacity` results files.

    python -m bench.analysis.capacity_combine bench/results/capacity_cpu.json bench/results/capacity_cpu_1000.json \\
        bench/results/capacity_cpu_r1_1000.json --out bench/results/capacity_cpu_combined

A capacity grid is often filled by several invocations: a resumed run directory that grew its grid, a fresh
directory for more cells, a recipe changed for one rank (`--lr 5e-4`, `--epochs 12`). This puts their cells into
one set of curves: one curve per rank and recipe, where a recipe is the values of the settings that differ
between the files (files with the same settings share a curve; one with another lr gets its own, labelled
"r=64, lr 0.0005"). A cell (rank, facts, recipe) found in several files is taken from the first file that has it
and the others are listed (`duplicate_cells`) with whether their recall agrees. The settings that must agree for
the cells to be comparable at all (model, dtype, seed, attributes, question template) are checked: files that
differ there are refused, naming the file and the setting.

Writes <out>.json (the curves with every cell, the sources with their commands and commits), <out>.md (the
table) and <out>.png (the plot, with matplotlib).
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.capacity import format_table, plot_curves
from bench.common import atomic_write_json, atomic_write_text, git_commit, read_results_json
from lora_mem.cli import Parser

# Settings under which cells from different files measure the same thing; a file differing in one is refused.
MUST_AGREE = ("model", "dtype", "seed", "attributes", "question_template")
# Settings that describe the grid or the run, not the recipe: never part of a curve's label.
NOT_RECIPE = MUST_AGREE + ("preset", "max_new_tokens")


class CombineError(ValueError):
    pass


def load(path: Path) -> dict:
    r = read_results_json(path, "capacity results file", CombineError)
    if r.get("benchmark") != "capacity" or "cells" not in r or "settings" not in r:
        raise CombineError(f"{path}: not a bench.capacity results file (no benchmark 'capacity' with settings and "
                           f"cells)")
    return r


def recipe_keys(files: list[tuple[Path, dict]]) -> list[str]:
    """The settings whose values differ between the files (in the first file's order)."""
    first = files[0][1]["settings"]
    keys = [k for k in first if k not in NOT_RECIPE]
    return [k for k in keys if any(r["settings"].get(k) != first.get(k) for _, r in files[1:])]


def label(rank: int, settings: dict, keys: list[str]) -> str:
    parts = [f"r={rank}"]
    for k in keys:
        v = settings.get(k)
        parts.append(f"{k.replace('_', ' ')} {v:g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}")
    return ", ".join(parts)


def combine(paths: list[Path]) -> dict:
    files = [(Path(p), load(p)) for p in paths]
    if not files:
        raise CombineError("no results files given")
    first_path, first = files[0]
    for path, r in files[1:]:
        for k in MUST_AGREE:
            a, b = first["settings"].get(k, first.get(k)), r["settings"].get(k, r.get(k))
            if a != b:
                raise CombineError(f"{path}: setting {k!r} is {b!r}, {first_path} has {a!r}: their cells do not "
                                   f"measure the same thing")
    keys = recipe_keys(files)
    curves: dict[str, dict] = {}
    duplicates = []
    base: dict[str, dict] = {}
    for path, r in files:
        recipe = {k: r["settings"].get(k) for k in keys}
        for n, b in (r.get("base_by_facts") or {}).items():
            base.setdefault(str(n), b)
        for c in r["cells"]:
            name = label(c["rank"], r["settings"], keys)
            curve = curves.setdefault(name, {"label": name, "rank": c["rank"], "recipe": recipe, "cells": {}})
            if c["n_facts"] in curve["cells"]:
                kept = curve["cells"][c["n_facts"]]
                duplicates.append({"curve": name, "n_facts": c["n_facts"], "kept_from": kept["source"],
                                   "also_in": str(path),
                                   "same_recall": kept["facts_recalled"] == c.get("facts_recalled")})
                continue
            curve["cells"][c["n_facts"]] = {**c, "source": str(path)}
    ordered = sorted(curves.values(), key=lambda cv: (cv["rank"], [str(cv["recipe"][k]) for k in keys]))
    sizes = sorted({n for cv in ordered for n in cv["cells"]})
    out_curves = [{**cv, "cells": [cv["cells"][n] for n in sorted(cv["cells"])]} for cv in ordered]
    return {
        "benchmark": "capacity (combined)",
        "sources": [{"file": str(p), "command": r.get("command"), "git_commit": r.get("git_commit"),
                     "device": r.get("device"), "settings": r["settings"],
                     "cells": len(r["cells"])} for p, r in files],
        "shared_settings": {k: first["settings"].get(k, first.get(k)) for k in MUST_AGREE},
        "recipe_settings": keys,
        "facts": sizes,
        "base_by_facts": {str(n): base[str(n)] for n in sizes if str(n) in base} or None,
        "curves": out_curves,
        "duplicate_cells": duplicates,
    }


def curve_styles(curves: list[dict]) -> list[dict]:
    """A colour per rank and a line style per recipe within it, so a rank's recipes read as one family."""
    ranks = sorted({cv["rank"] for cv in curves})
    seen: dict[int, int] = {}
    styles = []
    for cv in curves:
        k = seen.get(cv["rank"], 0)
        seen[cv["rank"]] = k + 1
        styles.append({"color": f"C{ranks.index(cv['rank']) % 10}", "linestyle": ("-", "--", ":", "-.")[k % 4]})
    return styles


def main(argv: list[str] | None = None) -> dict:
    ap = Parser(prog="python -m bench.analysis.capacity_combine", description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="bench.capacity results files")
    ap.add_argument("--out", required=True, help="output path without suffix: writes .json, .md and .png")
    ap.add_argument("--no-plot", action="store_true", help="write no .png (the plot needs matplotlib)")
    args = ap.parse_args(argv)
    if not args.no_plot:
        ap.require("matplotlib", extra="plot", needed_for="the plot (or --no-plot)")
    try:
        result = combine([Path(f) for f in args.files])
    except CombineError as e:
        raise SystemExit(f"error: {e}") from None
    result["command"] = " ".join(["python -m bench.analysis.capacity_combine"] + (sys.argv[1:] if argv is None else argv))
    result["git_commit"] = git_commit()
    out = Path(args.out)
    curves = [(cv["label"], cv["cells"]) for cv in result["curves"]]
    table = format_table(curves, result["facts"], result["base_by_facts"])
    atomic_write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), table + "\n")
    s = result["shared_settings"]
    if not args.no_plot:
        plot_curves(curves, result["facts"], result["base_by_facts"],
                    f"LoRA capacity: {s['model']} ({s['dtype']}), {len(args.files)} runs combined",
                    out.with_suffix(".png"), styles=curve_styles(result["curves"]))
    print(table)
    for d in result["duplicate_cells"]:
        if not d["same_recall"]:
            print(f"note: {d['curve']} at {d['n_facts']} facts differs between {d['kept_from']} (kept) and "
                  f"{d['also_in']}", file=sys.stderr)
    print(f"wrote {out.with_suffix('.json')}, .md{'' if args.no_plot else ', .png'}")
    return result


if __name__ == "__main__":
    main()
