"""bench.perf.greedy_head on a small head: every slice size picks the full product's tokens, the file is written."""

import json

from bench.perf.greedy_head import main


def test_greedy_head_benchmark_small(tmp_path):
    out = tmp_path / "gh.json"
    result = main(["--vocab", "1000", "--hidden", "32", "--batch-sizes", "1,5", "--slices", "7,256,4096",
                   "--repeats", "2", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert [r["batch"] for r in result["rows"]] == [1, 5]
    for row in result["rows"]:
        assert [s["vocab_slice"] for s in row["slices"]] == [7, 256, 4096]
        assert all(s["same_tokens"] and s["ms"] > 0 and s["speedup_vs_one_product"] >= 0 for s in row["slices"])  # a ratio, whatever the load
