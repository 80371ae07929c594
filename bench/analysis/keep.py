"""Copy a finished bench.locomo run's small files into a folder for committing (no adapters, no caches).

    python -m bench.analysis.keep runs/locomo-r8 bench/results/locomo/smollm2-r8

Copies results.json, predictions.jsonl and table.md, and each conversation's training record
(conversations/<id>/train.json, with its loss curve) as loss/<id>.json, the layout `bench.analysis.report` and
`bench.analysis.context_coverage` read. Refuses an unfinished run.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from lora_mem.cli import Parser

RUN_FILES = ("results.json", "predictions.jsonl", "table.md")


def keep(run_dir: Path, dest: Path) -> list[Path]:
    run_dir, dest = Path(run_dir), Path(dest)
    missing = [f for f in RUN_FILES if not (run_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir}: no {', '.join(missing)} (is the run finished?)")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for f in RUN_FILES:
        shutil.copyfile(run_dir / f, dest / f)
        written.append(dest / f)
    for train in sorted((run_dir / "conversations").glob("*/train.json")):
        (dest / "loss").mkdir(exist_ok=True)
        target = dest / "loss" / f"{train.parent.name}.json"
        shutil.copyfile(train, target)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    ap = Parser(prog="python -m bench.analysis.keep", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a finished bench.locomo --out directory")
    ap.add_argument("dest", help="where the small files go, e.g. bench/results/locomo/<name>")
    args = ap.parse_args(argv)
    try:
        written = keep(Path(args.run_dir), Path(args.dest))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{len(written)} files into {args.dest}")
    return written


if __name__ == "__main__":
    main()
