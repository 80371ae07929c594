"""bench/perf/gpu_suite.sh is run where no test runs first (a lent GPU, minutes of device time): every command it holds
must parse here, with the options it passes, and its limits must fit one device command; its dry run (every step on
the CPU with tiny shapes) must finish with every step's results."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parent.parent / "bench" / "perf" / "gpu_suite.sh"


def suite_steps() -> list[tuple[int, str, list[str]]]:
    """(limit seconds, name, argv) of every `step` line, continuation lines joined, $OUT set."""
    text = SUITE.read_text().replace("\\\n", " ")
    steps = []
    for line in text.splitlines():
        m = re.match(r"^step (\d+) (\S+) (.*)$", line.strip())
        if m:
            argv = shlex.split(m.group(3).replace("$OUT", "/tmp/out").replace('"', ""))
            steps.append((int(m.group(1)), m.group(2), argv))
    return steps


def parser_for(module: str):
    if module == "bench.perf.decode":
        from bench.perf.decode import parse_args
        return parse_args
    if module == "bench.perf.project_locomo":
        from bench.perf.project_locomo import parse_args
        return parse_args
    if module == "bench.perf.kernels":
        from bench.perf.kernels import build_parser
        return build_parser().parse_args
    if module == "bench.perf.train_throughput":
        from bench.perf.train_throughput import build_parser
        return build_parser().parse_args
    if module == "bench.perf.random_checkpoint":
        from bench.perf.random_checkpoint import build_parser
        return build_parser().parse_args
    if module == "bench.perf.cpu_bf16":
        from bench.perf.cpu_bf16 import build_parser
        return build_parser().parse_args
    if module == "bench.capacity":
        from bench.capacity import parse_args
        return parse_args
    raise AssertionError(f"gpu_suite.sh runs {module}: add its parser to this test")


def test_every_step_parses_and_the_limits_fit_one_device_command():
    steps = suite_steps()
    assert {name for _, name, _ in steps} >= {"kernel-tests", "bench-kernels", "train-throughput",
                                              "decode-synthetic", "project-locomo",
                                              "cpu-bf16-gemm", "cpu-bf16-train"}
    assert sum(limit for limit, _, _ in steps) <= 600  # the device tool's limit for one command
    for _, name, argv in steps:
        assert argv[:2] == ["python", "-m"], name
        module, rest = argv[2], argv[3:]
        if module == "pytest":
            files = [a for a in rest if a.endswith(".py")]
            assert files and all((SUITE.parents[2] / f).is_file() for f in files), name
            continue
        parser_for(module)(rest)  # raises SystemExit on an unknown or bad option


def test_projection_reads_what_the_suite_writes():
    outs = {}
    for _, name, argv in suite_steps():
        if "--out" in argv:
            outs[name] = argv[argv.index("--out") + 1]
    proj = next(argv for _, name, argv in suite_steps() if name == "project-locomo")
    assert proj[proj.index("--train") + 1] == outs["train-throughput"]
    assert proj[proj.index("--decode") + 1] == outs["decode-synthetic"]


def test_parsers_do_reject_bad_options():
    for module in ("bench.perf.decode", "bench.perf.project_locomo", "bench.perf.kernels", "bench.perf.train_throughput"):
        with pytest.raises(SystemExit):  # an unknown option beside otherwise complete arguments
            parser_for(module)(["--train", "t.json", "--decode", "d.json", "--nope"]
                               if module == "bench.perf.project_locomo" else ["--nope"])


def test_steps_run_in_order_and_write_under_out():
    """Kernel tests, the kernel benchmark, training throughput, a capacity cell, in that order; the checkpoint they load
    is written before; every results file goes under $OUT (what the device tool returns), the checkpoint does not."""
    steps = suite_steps()
    names = [name for _, name, _ in steps]
    order = ["random-checkpoint", "kernel-tests", "bench-kernels", "train-throughput", "capacity-cell",
             "decode-synthetic", "project-locomo", "cpu-bf16-gemm", "cpu-bf16-train"]  # the GPU's first
    assert [n for n in names if n in order] == order
    for _, name, argv in steps:
        for option in ("--out", "--results-file"):
            if option in argv:
                target = argv[argv.index(option) + 1]
                assert target.startswith("/tmp/out/") == (name != "random-checkpoint"), (name, target)
    capacity = next(argv for _, name, argv in steps if name == "capacity-cell")
    checkpoint = next(argv for _, name, argv in steps if name == "random-checkpoint")
    assert capacity[capacity.index("--model") + 1] == checkpoint[checkpoint.index("--out") + 1]
    kernels = next(argv for _, name, argv in steps if name == "bench-kernels")
    assert kernels[kernels.index("--ranks") + 1] == "8,16"
    assert kernels[kernels.index("--shapes") + 1] == "qo,kv,gate_up,down"
    train = next(argv for _, name, argv in steps if name == "train-throughput")
    assert "--setup" in train and train[train.index("--setup") + 1] == "gpu"  # bf16, Qwen2.5-1.5B shapes, random
    host = next(argv for _, name, argv in steps if name == "cpu-bf16-train")
    assert host[host.index("--setup") + 1] == "cpu" and host[host.index("--model") + 1] == \
        checkpoint[checkpoint.index("--out") + 1]  # no weights there: the default model's shapes, random
    assert host[host.index("--sides") + 1].split(",") == ["lora-mem", "lora-mem:bfloat16", "peft:bfloat16"]


def test_dry_run_finishes_every_step_with_its_results(tmp_path):
    """The whole suite on the CPU with tiny shapes: every step exits 0 and leaves its results file."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` is this interpreter
    proc = subprocess.run(["bash", str(SUITE), "--dry-run", str(tmp_path)], cwd=SUITE.parents[2], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "suite.json").read_text())
    assert summary["dry_run"] is True
    assert [s["step"] for s in summary["steps"]] == [name for _, name, _ in suite_steps()]
    failed = [s for s in summary["steps"] if s["rc"] != 0]
    assert not failed, f"{failed}\n{(tmp_path / 'suite.log').read_text()[-4000:]}"
    train = json.loads((tmp_path / "train_cuda.json").read_text())
    row = train["rows"][0]
    assert row["lora-mem"]["tokens_per_second"] > 0 and row["peft"]["tokens_per_second"] > 0
    kernels = json.loads((tmp_path / "kernels_cuda.json").read_text())
    assert kernels["rows"] and kernels["settings"]["kernel_fp32_precision"] == "ieee"
    assert list((tmp_path / "capacity-cell" / "cells").glob("r8-n*.json"))
    for name in ("decode_cuda_synthetic.json", "locomo_projection_cuda.json"):
        assert json.loads((tmp_path / name).read_text())
    host = json.loads((tmp_path / "cpu_bf16_host.json").read_text())
    assert host["gemms"] and all(g["fp32_gflops"] > 0 and g["bf16_gflops"] > 0 for g in host["gemms"])
    assert "cpu_bf16_instructions" in host and host["default_cpu_dtype"] in ("float32", "bfloat16")
    bf16 = json.loads((tmp_path / "train_cpu_host_bf16.json").read_text())["rows"][0]
    assert bf16["lora-mem:bfloat16"]["tokens_per_second"] > 0 and bf16["peft:bfloat16"]["tokens_per_second"] > 0
