"""Every bench/perf command line refuses a bad option value while parsing, before any work: exit status 2 and one
error line that names the option."""

from __future__ import annotations

import importlib

import pytest

CASES = [
    ("bench.perf.kernels", ["--ranks", "0"], "--ranks"),
    ("bench.perf.kernels", ["--dropout", "1.5"], "--dropout"),
    ("bench.perf.kernels", ["--shapes", "qo,nope"], "--shapes"),
    ("bench.perf.kernels", ["--ops", "gelu"], "--ops"),
    ("bench.perf.kernels", ["--repeats", "0"], "--repeats"),
    ("bench.perf.train_throughput", ["--rank", "0"], "--rank"),
    ("bench.perf.train_throughput", ["--batch-sizes", "1,x"], "--batch-sizes"),
    ("bench.perf.train_throughput", ["--sides", "lora-mem,nope"], "--sides"),
    ("bench.perf.train_throughput", ["--warmup", "-1"], "--warmup"),
    ("bench.perf.decode", ["--repeats", "0"], "--repeats"),
    ("bench.perf.decode", ["--device", "tpu"], "--device"),
    ("bench.perf.decode", ["--hf-bs1-questions", "-1"], "--hf-bs1-questions"),
    ("bench.perf.decode", ["--random-adapter-b-std", "nan"], "--random-adapter-b-std"),
    ("bench.perf.step_floor", ["--batch", "0"], "--batch"),
    ("bench.perf.step_floor", ["--setup", "tpu"], "--setup"),
    ("bench.perf.attention", ["--seq-lens", "128,0"], "--seq-lens"),
    ("bench.perf.attention", ["--device", "tpu"], "--device"),
    ("bench.perf.greedy_head", ["--slices", "a"], "--slices"),
    ("bench.perf.greedy_head", ["--dtype", "int8"], "--dtype"),
    ("bench.perf.project_locomo", ["--train", "t.json", "--decode", "d.json", "--goal-minutes", "0"], "--goal-minutes"),
    ("bench.perf.shared_batches", ["--random-adapters", "--rank", "0"], "--rank"),
    ("bench.perf.compile_check", ["--archs", "75"], "--archs"),
    ("bench.perf.random_checkpoint", ["--out", "/tmp/x", "--layers", "0"], "--layers"),
]


@pytest.mark.parametrize("module, argv, option", CASES, ids=[f"{m.split('.')[-1]} {' '.join(a)}" for m, a, _ in CASES])
def test_bad_value_is_one_error_line_naming_the_option(module, argv, option, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and option in err, err
