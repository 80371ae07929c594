"""Peak resident memory and time of answering LoCoMo: two versions of the code, the same runs, one results file.

Each (code, method) is one `python -m bench.locomo --method M` process on the same conversations, started from that
code's directory (a `git worktree add` of the commit to compare against, and this checkout), whose peak resident
memory (VmHWM, read by the process itself as it exits) and wall time are recorded, with the answering time and
questions/s bench.locomo reports. The two versions take turns (before, after; then after, before for the next
method), so a shared machine's drift falls on both. lora+rag answers with the adapters of an earlier lora run
(`--adapters`, trained once, the same for both versions). The run directories are kept under `--runs` and the
predictions compared with bench.analysis.compare_runs: a change meant to save memory must not change an answer.

    git worktree add /tmp/before <commit>
    python -m bench.perf.memory --before /tmp/before --adapters runs/dev-queries \\
        --lora-args="--train-format text+queries --query-phrasings 1"     # -> bench/results/answer_memory_cpu.json

The code of each side is recorded (its git commit), and so is what it ran with (bench.locomo's results.json:
device, threads, kernel policy, dtype).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO_ROOT, RESULTS_DIR, atomic_write_json, cpu_details
from bench.perf.timing import loadavg
from lora_mem.cli import Parser, id_list

METHODS = ("base", "rag", "lora+rag")
# Runs bench.locomo as `python -m` would from the current directory and writes its peak resident memory (VmHWM: this
# process's own, not the parent's it was forked from) and wall seconds to argv[1] when it exits.
CHILD = """
import atexit, json, runpy, sys, time
t0, report = time.perf_counter(), sys.argv.pop(1)

def write_report():
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    with open(report, "w") as f:
        json.dump({"peak_rss_bytes": peak, "wall_seconds": time.perf_counter() - t0}, f)

atexit.register(write_report)
sys.argv[0] = "bench.locomo"
runpy.run_module("bench.locomo", run_name="__main__", alter_sys=True)
"""


def git_commit(code: Path) -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=code, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def locomo_args(method: str, args) -> list[str]:
    extra = ["--adapters-from", str(Path(args.adapters).resolve()), *shlex.split(args.lora_args)] \
        if method == "lora+rag" else []
    return ["--method", method, "--conversations", ",".join(args.conversations), "--data", str(args.data),
            "--quiet", *(["--threads", str(args.threads)] if args.threads else []), *extra, *shlex.split(args.extra)]


def run_one(side: str, code: Path, method: str, args) -> dict:
    """bench.locomo of `code` on `method` in a fresh process (a fresh --out); its memory, time and results."""
    out = Path(args.runs).resolve() / f"{side}-{method.replace('+', '-')}"
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    report = out.with_suffix(".peak.json")
    cmd = [sys.executable, "-c", CHILD, str(report), *locomo_args(method, args), "--out", str(out)]
    print(f"[{side}] {method} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=code, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not report.is_file():
        return {"side": side, "method": method, "error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    measured = json.loads(report.read_text())
    results = json.loads((out / "results.json").read_text())
    row = {"side": side, "method": method, "run": str(out), "peak_rss_bytes": measured["peak_rss_bytes"],
           "peak_rss_gib": round(measured["peak_rss_bytes"] / 2**30, 3), "process_seconds": round(seconds, 2),
           "answer_seconds": round(results["answer_seconds"], 2), "questions": results["scores"]["n"],
           "answer_questions_per_second": results["answer_questions_per_second"],
           "avg_f1": results["scores"].get("avg_f1"), "git_commit": results.get("git_commit"),
           "dtype": results.get("dtype"), "threads": results.get("threads") or results["settings"].get("threads"),
           "kernel_policy": results.get("kernel_policy"), "device": results.get("device")}
    print(f"[{side}] {method}: peak {row['peak_rss_gib']:.2f} GiB, answering {row['answer_seconds']:.0f} s "
          f"({row['questions']} questions)", file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = Parser(prog="python -m bench.perf.memory", description=__doc__.split("\n")[0])
    ap.add_argument("--before", type=Path, required=True, help="the code to compare against (a git worktree)")
    ap.add_argument("--after", type=Path, default=REPO_ROOT, help="the code measured (default: this checkout)")
    ap.add_argument("--methods", type=id_list, default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument("--conversations", type=id_list, default="conv-26,conv-30", help="default: the dev split")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/locomo/locomo10.json"), help="LoCoMo file")
    ap.add_argument("--adapters", default=None, help="lora+rag: a finished lora run whose adapters both sides use")
    ap.add_argument("--lora-args", default="", help="lora+rag: the adapters' training options, as bench.locomo "
                                                     "takes them (its --adapters-from takes the rest over)")
    ap.add_argument("--extra", default="", help="more bench.locomo options for every run")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of every run (default: torch's)")
    ap.add_argument("--runs", default="runs/answer-memory", help="where the run directories are kept")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "answer_memory_cpu.json", help="the results file")
    args = ap.parse_args(argv)
    args.methods, args.conversations = args.methods.split(","), args.conversations.split(",")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    if "lora+rag" in args.methods and not (args.adapters and (Path(args.adapters) / "adapters").is_dir()):
        ap.error(f"--adapters: lora+rag needs a finished lora run with adapters/ (got {args.adapters})")
    for name, code in (("--before", args.before), ("--after", args.after)):
        if not (code / "bench" / "locomo.py").is_file():
            ap.error(f"{name} {code}: not a lora-mem checkout (no bench/locomo.py)")
    if not args.data.is_file():
        ap.error(f"--data {args.data}: no such file")
    args.data = args.data.resolve()

    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    results = {"benchmark": "peak resident memory and time of bench.locomo answering, two versions of the code",
               "method": "one bench.locomo process per (code, method), fresh --out; peak RSS = the process's VmHWM "
                         "at exit; the two versions in turns (before/after, then after/before)",
               "conversations": args.conversations, "cpu": cpu_details(), "loadavg_start": loadavg(),
               "command": " ".join(["python -m bench.perf.memory", *(argv if argv is not None else sys.argv[1:])]),
               "code": {side: {"dir": str(code), "git_commit": git_commit(code)} for side, code in sides.items()},
               "rows": [], "comparisons": {}}
    for i, method in enumerate(args.methods):
        order = ["before", "after"] if i % 2 == 0 else ["after", "before"]
        rows = {side: run_one(side, sides[side], method, args) for side in order}
        results["rows"] += [rows[s] for s in ("before", "after")]
        before, after = rows["before"], rows["after"]
        if "error" in before or "error" in after:
            continue
        from bench.analysis.compare_runs import compare

        same = compare(Path(before["run"]), Path(after["run"]))
        results["comparisons"][method] = {
            "peak_rss_ratio_after_vs_before": round(after["peak_rss_bytes"] / before["peak_rss_bytes"], 4),
            "answer_time_ratio_after_vs_before": round(after["answer_seconds"] / before["answer_seconds"], 4),
            "identical_predictions": same["predictions_identical"], "questions": same["questions"],
            "settings_that_differ": same["settings_that_differ"]}
        atomic_write_json(args.out, results)  # as it goes
    results["loadavg_end"] = loadavg()
    atomic_write_json(args.out, results)
    print(f"{'method':<10} {'side':<7} {'peak GiB':>9} {'answer s':>9} {'q/s':>6}")
    for r in results["rows"]:
        if "error" in r:
            print(f"{r['method']:<10} {r['side']:<7} error: {r['error']}")
            continue
        print(f"{r['method']:<10} {r['side']:<7} {r['peak_rss_gib']:>9.2f} {r['answer_seconds']:>9.0f} "
              f"{r['answer_questions_per_second']:>6.2f}")
    for method, c in results["comparisons"].items():
        print(f"{method}: peak x{c['peak_rss_ratio_after_vs_before']:.2f}, answering time "
              f"x{c['answer_time_ratio_after_vs_before']:.2f}, identical predictions {c['identical_predictions']}/"
              f"{c['questions']}")
    print(f"results: {args.out}")
    if any("error" in r for r in results["rows"]):
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
