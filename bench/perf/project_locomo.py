"""How long the full LoCoMo experiment (base + r=8) takes on a device, projected from measured rates.

    python -m bench.perf.project_locomo --train bench/results/train_cpu.json --decode bench/results/decode_cpu_locomo.json
    python -m bench.perf.project_locomo --train train_cuda.json --decode decode_cuda_synthetic.json   # GPU files

The workload is that of committed full runs (`--runs`, default the base and r=8 runs of the default model,
bench/results/locomo/smollm2-base and smollm2-r8): their training tokens (windows x seq_len x epochs, over all 10
conversations) and the questions they answered. The rates are lora-mem's, from one row of a
`bench.perf.train_throughput` results file (training tokens/s; `--train-batch`, by default the row whose batch x seq_len
is closest to the runs' batch x seq_len) and from the answering workload of a `bench.perf.decode` results file
(questions/s with an adapter: `locomo`, or `synthetic` where there is no checkpoint or tokenizer, as on a GPU with
Qwen2.5-1.5B shapes). Projected time = tokens / (tokens/s) + questions / (questions/s), per run, summed; model
loading and start-up are left out.

What makes it approximate, recorded in the file: the throughput benchmark's rows are random tokens at one batch
and sequence length, not the runs' windows; a `synthetic` decode rate has every answer at the cap's length (real
answers stop early), so its answering time is an upper bound; the base run answers without an adapter, but is
projected at the with-adapter rate (slower); and on a model with another tokenizer the token and question counts
are the default model's, a stand-in. Where the rates come from the device type the runs were measured on (the
CPU), the file also holds the runs' measured times and the projection's ratio to them: how far off the method is.

Writes bench/results/locomo_projection_<device>.json (`--out` to choose).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.common import RESULTS_DIR, atomic_write_json, git_commit, name_slug, read_results_json

DEFAULT_RUNS = [RESULTS_DIR / "locomo" / "smollm2-base", RESULTS_DIR / "locomo" / "smollm2-r8"]
# The speed issue's goals for the full experiment (base + r=8), minutes: this CPU; one GPU, Qwen2.5-1.5B shapes.
GOAL_MINUTES = {"cpu": 45.0, "cuda": 5.0}
ANSWER_WORKLOADS = ("locomo", "synthetic")


class ProjectionError(ValueError):
    """A results file that is missing, unreadable or lacks a field the projection needs (one line)."""


def read_results(path: Path, what: str) -> dict:
    return read_results_json(path, what, ProjectionError)


def field(d: dict, key: str, path: Path):
    if key not in d:
        raise ProjectionError(f"{path}: no field {key!r}")
    return d[key]


def run_workload(run_dir: Path) -> dict:
    """What one full bench.locomo run computed (from its results.json): training tokens, questions answered,
    and the times it measured."""
    path = Path(run_dir) / "results.json"
    r = read_results(path, "a bench.locomo results file")
    convs = field(r, "conversations", path)
    settings = field(r, "settings", path)
    return {
        "run": str(run_dir),
        "method": settings.get("method"),
        "model": settings.get("model"),
        "rank": settings.get("rank") if settings.get("method") != "base" else None,
        "conversations": len(convs),
        "train_tokens": int(r.get("train_tokens") or 0),
        "questions": sum(int(field(c, "n_questions", path)) for c in convs),
        "batch_size": settings.get("batch_size"),
        "seq_len": settings.get("seq_len"),
        "measured_device": r.get("device"),
        "measured_device_type": r.get("device_type"),
        "measured_cpu": r.get("cpu"),
        "measured_train_seconds": r.get("train_seconds"),
        "measured_answer_seconds": r.get("answer_seconds"),
        "measured_compute_seconds": r.get("compute_seconds"),
        "measured_wall_seconds": r.get("wall_seconds_this_invocation"),
    }


def training_rate(path: Path, batch: int | None, tokens_per_step: int | None) -> dict:
    """lora-mem's training tokens/s from a bench.perf.train_throughput file: the row of `batch`, else the row whose
    batch x seq_len is closest to `tokens_per_step` (ties: the smaller batch)."""
    t = read_results(path, "a bench.perf.train_throughput results file")
    rows = field(t, "rows", path)
    seq_len = field(t, "seq_len", path)
    if not rows:
        raise ProjectionError(f"{path}: no rows")
    if batch is not None:
        chosen = [r for r in rows if r.get("batch") == batch]
        if not chosen:
            raise ProjectionError(f"{path}: no row with batch {batch} (rows: {[r.get('batch') for r in rows]})")
        row, why = chosen[0], f"--train-batch {batch}"
    else:
        target = tokens_per_step or seq_len
        row = min(rows, key=lambda r: (abs(r["batch"] * seq_len - target), r["batch"]))
        why = f"batch x seq_len = {row['batch'] * seq_len} closest to the runs' {target} tokens per step"
    side = row.get("lora-mem") or {}
    if "tokens_per_second" not in side:
        raise ProjectionError(f"{path}: row batch {row.get('batch')} has no lora-mem tokens_per_second "
                              f"({side.get('error', 'side missing')})")
    return {"file": str(path), "device": t.get("device"), "device_type": t.get("device_type"), "cpu": t.get("cpu"),
            "model": t.get("model"), "dtype": t.get("dtype"), "seq_len": seq_len, "batch": row["batch"],
            "row_chosen_by": why, "tokens_per_second": side["tokens_per_second"],
            "peft_tokens_per_second": (row.get("peft") or {}).get("tokens_per_second"),
            "git_commit": t.get("git_commit")}


def answering_rate(path: Path) -> dict:
    """lora-mem's questions/s with an adapter from a bench.perf.decode file (its locomo or synthetic workload)."""
    d = read_results(path, "a bench.perf.decode results file")
    ws = [w for w in field(d, "workloads", path) if w.get("workload") in ANSWER_WORKLOADS]
    if not ws:
        raise ProjectionError(f"{path}: no {' or '.join(ANSWER_WORKLOADS)} workload (run bench.perf.decode --workloads "
                              f"locomo, or synthetic on a model without a tokenizer)")
    w = ws[0]
    return {"file": str(path), "device": d.get("device_name"), "device_slug": d.get("device"),
            "model": d.get("model"), "dtype": d.get("dtype"), "workload": w["workload"],
            "batch_size": w.get("batch_size"), "max_new_tokens": w.get("max_new_tokens"),
            "questions_measured": w.get("questions"),
            "questions_per_second": field(w.get("lora_mem", {}), "questions_per_s", path),
            "upper_bound": w["workload"] == "synthetic", "git_commit": d.get("git_commit")}


def device_slug_of(train: dict, decode: dict) -> str:
    if train["device_type"] == "cpu":
        return "cpu"
    return decode.get("device_slug") or name_slug(str(train["device"]))


def host_mismatch(run: dict, train: dict) -> str | None:
    """Why the training rate is not from the run's machine, or None when it is: same device type and name and,
    where both files record the CPU (bench.common.cpu_details: a VM's "AMD EPYC" can be any generation), the same
    name, family, model and vector extensions and a clock within 5%. A file that records its CPU cannot be matched
    with one that does not."""
    if run["measured_device_type"] != train["device_type"]:
        return f"device type {run['measured_device_type']} vs {train['device_type']}"
    if run["measured_device"] and train["device"] and run["measured_device"] != train["device"]:
        return f"device {run['measured_device']!r} vs {train['device']!r}"
    a, b = run.get("measured_cpu"), train.get("cpu")
    if (a is None) != (b is None):
        return (f"the training rate's file records its CPU ({b}), the run does not" if a is None else
                f"the run records its CPU ({a}), the training rate's file does not")
    if a is not None:
        for key in ("name", "family", "model", "vector_extensions"):
            if a.get(key) != b.get(key):
                return f"CPU {key} {a.get(key)!r} vs {b.get(key)!r}"
        if a.get("mhz") and b.get("mhz") and abs(a["mhz"] / b["mhz"] - 1) > 0.05:
            return f"CPU clock {a['mhz']:.0f} vs {b['mhz']:.0f} MHz"
    return None


def project(runs: list[dict], train: dict, answer: dict, goal_minutes: float | None = None) -> dict:
    """Per-run and total projected seconds; measured times beside them when the rates are from the runs' machine."""
    kind = "cpu" if train["device_type"] == "cpu" else "cuda"
    goal = GOAL_MINUTES[kind] if goal_minutes is None else goal_minutes
    rows, total = [], 0.0
    mismatches = [f"{r['run']}: {why}" for r in runs if (why := host_mismatch(r, train))]
    comparable = not mismatches
    for r in runs:
        train_s = r["train_tokens"] / train["tokens_per_second"]
        answer_s = r["questions"] / answer["questions_per_second"]
        row = {"run": r["run"], "method": r["method"], "train_tokens": r["train_tokens"], "questions": r["questions"],
               "projected_train_seconds": round(train_s, 1), "projected_answer_seconds": round(answer_s, 1),
               "projected_seconds": round(train_s + answer_s, 1)}
        if comparable:
            measured = (r["measured_train_seconds"] or 0.0) + (r["measured_answer_seconds"] or 0.0)
            row.update({"measured_train_seconds": r["measured_train_seconds"],
                        "measured_answer_seconds": r["measured_answer_seconds"],
                        "measured_seconds": round(measured, 1),
                        "projected_over_measured": round((train_s + answer_s) / measured, 3) if measured else None})
        rows.append(row)
        total += train_s + answer_s
    out = {"runs": rows, "projected_seconds": round(total, 1), "projected_minutes": round(total / 60, 2),
           "goal_minutes": goal, "meets_goal": total / 60 < goal, "comparable_to_measured": comparable}
    if mismatches:  # rates from another machine: no measured times beside them
        out["not_comparable_because"] = mismatches
    if comparable:
        measured = sum(r["measured_seconds"] for r in rows)
        out.update({"measured_seconds": round(measured, 1),
                    "projected_over_measured": round(total / measured, 3) if measured else None})
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from lora_mem.cli import Parser, positive_float, positive_int

    ap = Parser(prog="python -m bench.perf.project_locomo", description=__doc__.split("\n")[0])
    ap.add_argument("--train", required=True, help="a bench.perf.train_throughput results file (lora-mem tokens/s)")
    ap.add_argument("--decode", required=True, help="a bench.perf.decode results file with a locomo or synthetic workload")
    ap.add_argument("--runs", nargs="+", default=[str(p) for p in DEFAULT_RUNS],
                    help="bench.locomo run directories whose workload is projected (default: base and r=8)")
    ap.add_argument("--train-batch", type=positive_int, default=None,
                    help="the training row to use (default: batch x seq_len closest to the runs')")
    ap.add_argument("--goal-minutes", type=positive_float, default=None, help="default 45 on a CPU, 5 on a GPU")
    ap.add_argument("--out", default=None, help="default bench/results/locomo_projection_<device>.json")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        runs = [run_workload(Path(r)) for r in args.runs]
        steps = {(r["batch_size"] or 0) * (r["seq_len"] or 0) for r in runs if r["train_tokens"]}
        train = training_rate(Path(args.train), args.train_batch, max(steps) if steps else None)
        answer = answering_rate(Path(args.decode))
    except ProjectionError as e:
        raise SystemExit(f"error: {e}") from None
    caveats = [f"training rate: random tokens at batch {train['batch']} x seq {train['seq_len']} "
               f"({train['row_chosen_by']}); the runs train windows of batch x seq_len "
               f"{sorted({(r['batch_size'], r['seq_len']) for r in runs if r['train_tokens']})}",
               "the base run answers without an adapter, projected at the with-adapter rate (slower)"]
    if answer["upper_bound"]:
        caveats.append(f"answering rate: synthetic workload, every answer exactly {answer['max_new_tokens']} tokens "
                       f"(real answers stop at EOS), so the answering time is an upper bound")
    models = {r["model"] for r in runs}
    if train["model"] not in models:
        caveats.append(f"token and question counts are those of the runs' model ({', '.join(sorted(models))}), "
                       f"a stand-in for {train['model']}'s tokenizer")
    result = {
        "benchmark": "full LoCoMo experiment (base + r=8), projected from measured rates",
        "command": " ".join(["python -m bench.perf.project_locomo"] + (sys.argv[1:] if argv is None else list(argv))),
        "git_commit": git_commit(),
        "training_rate": train,
        "answering_rate": answer,
        "workload": runs,
        "caveats": caveats,
        **project(runs, train, answer, args.goal_minutes),
    }
    out = Path(args.out) if args.out else RESULTS_DIR / f"locomo_projection_{device_slug_of(train, answer)}.json"
    atomic_write_json(out, result)
    print(f"{train['model']} on {train['device']}: training {train['tokens_per_second']:.1f} tokens/s "
          f"(batch {train['batch']}), answering {answer['questions_per_second']:.2f} questions/s ({answer['workload']})")
    for r in result["runs"]:
        measured = f", measured {r['measured_seconds']:.0f} s ({r['projected_over_measured']:.2f}x)" \
            if "measured_seconds" in r else ""
        print(f"  {r['method']:<6} {r['train_tokens']:>8} tokens, {r['questions']:>5} questions: projected "
              f"{r['projected_seconds']:.0f} s{measured}")
    print(f"  total projected {result['projected_minutes']:.1f} min (goal < {result['goal_minutes']:g} min: "
          f"{'met' if result['meets_goal'] else 'not met'})")
    for c in caveats:
        print(f"  - {c}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
