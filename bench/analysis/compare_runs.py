"""Are two bench.locomo runs the same? Predictions, losses and adapter weights, conversation by conversation.

    python -m bench.analysis.compare_runs runs/threads-1 runs/threads-2 --out bench/results/locomo/threads_check.json

What it answers: whether a setting that should not change results (the number of CPU threads, torchrun's sharding,
a refactor) changed them, and by how much: identical predictions, the largest loss difference per step, and the
largest absolute difference of any adapter weight.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.analysis.report import load_run
from bench.common import atomic_write_json, read_jsonl
from lora_mem.cli import Parser


def compare(a: Path, b: Path) -> dict:
    results_a, dir_a = load_run(a)
    results_b, dir_b = load_run(b)
    rows_a = {(r["sample_id"], r["question"]): r for r in read_jsonl(dir_a / "predictions.jsonl")}
    rows_b = {(r["sample_id"], r["question"]): r for r in read_jsonl(dir_b / "predictions.jsonl")}
    shared = sorted(set(rows_a) & set(rows_b))
    same = sum(rows_a[k]["prediction"] == rows_b[k]["prediction"] for k in shared)
    conversations = {}
    for sid in sorted({k[0] for k in shared}):
        entry: dict = {}
        trains = [d / "conversations" / sid / "train.json" for d in (dir_a, dir_b)]
        if all(t.is_file() for t in trains):
            la, lb = (json.loads(t.read_text())["losses"] for t in trains)
            entry["steps"] = min(len(la), len(lb))
            entry["max_loss_difference"] = max((abs(x - y) for x, y in zip(la, lb)), default=0.0)
        adapters = [d / "adapters" / sid / "adapter_model.safetensors" for d in (dir_a, dir_b)]
        if all(p.is_file() for p in adapters):
            wa, wb = (load_file(p) for p in adapters)
            entry["max_weight_difference"] = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
            entry["weights_identical"] = all(torch.equal(wa[k], wb[k]) for k in wa)
        entry["predictions_identical"] = sum(rows_a[k]["prediction"] == rows_b[k]["prediction"]
                                             for k in shared if k[0] == sid)
        entry["questions"] = sum(k[0] == sid for k in shared)
        conversations[sid] = entry
    return {"runs": [str(a), str(b)], "commands": [results_a.get("command"), results_b.get("command")],
            "settings_that_differ": {k: [results_a["settings"].get(k), results_b["settings"].get(k)]
                                     for k in sorted(set(results_a["settings"]) | set(results_b["settings"]))
                                     if results_a["settings"].get(k) != results_b["settings"].get(k)},
            "questions": len(shared), "predictions_identical": same,
            "scores": [results_a["scores"].get("avg_f1"), results_b["scores"].get("avg_f1")],
            "conversations": conversations}


def main(argv: list[str] | None = None) -> dict:
    ap = Parser(prog="python -m bench.analysis.compare_runs", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_a", help="a bench.locomo run directory")
    ap.add_argument("run_b", help="another run directory, compared with the first")
    ap.add_argument("--out", default=None, help="write the comparison here (JSON)")
    args = ap.parse_args(argv)
    result = compare(Path(args.run_a), Path(args.run_b))
    print(json.dumps({k: v for k, v in result.items() if k != "conversations"}, indent=1))
    if args.out:
        atomic_write_json(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
