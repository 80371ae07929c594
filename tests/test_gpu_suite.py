"""bench/perf/gpu_suite.sh is run where no test runs first (a lent GPU, minutes of device time): every command it holds
must parse here, with the options it passes, and its limits must fit one device command."""

from __future__ import annotations

import re
import shlex
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
    raise AssertionError(f"gpu_suite.sh runs {module}: add its parser to this test")


def test_every_step_parses_and_the_limits_fit_one_device_command():
    steps = suite_steps()
    assert {name for _, name, _ in steps} >= {"kernel-tests", "bench-kernels", "train-throughput",
                                              "decode-synthetic", "project-locomo"}
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
