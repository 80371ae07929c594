"""bench.perf.attention: SDPA and the block-causal GEMMs timed side by side; the file it writes, the memory it reports
and its option errors."""

import json

import pytest
import torch

from bench.perf.attention import main, saved_probs_bytes


def test_writes_every_variant_and_speedup(tmp_path):
    out = tmp_path / "attention.json"
    r = main(["--seq-lens", "16,40", "--blocks", "8,32", "--heads", "4", "--kv-heads", "2", "--head-dim", "8",
              "--repeats", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(r)) and saved["cpu"]["name"]
    assert [row["seq_len"] for row in saved["rows"]] == [16, 40]
    for row in saved["rows"]:
        for kind in ("train", "answer"):
            assert set(row[kind]) == {"sdpa_gqa", "sdpa_repeat_kv", "blocks_8", "blocks_32"}
            best = min(row[kind]["sdpa_gqa"]["ms_median"], row[kind]["sdpa_repeat_kv"]["ms_median"])
            for name in ("blocks_8", "blocks_32"):
                v = row[kind][name]
                assert v["speedup_vs_best_sdpa"] == pytest.approx(best / v["ms_median"], rel=2e-2, abs=2e-3)
        assert set(row["saved_probs_mb"]) == {"blocks_8", "blocks_32"}


def test_saved_probs_bytes_counts_each_block_s_keys():
    # T = 10, block 4: blocks of 4, 4, 2 rows seeing 4, 8, 10 keys; B = 2, H = 3, fp32
    assert saved_probs_bytes(2, 3, 10, 4, torch.float32) == 2 * 3 * (4 * 4 + 4 * 8 + 2 * 10) * 4
    assert saved_probs_bytes(1, 1, 10, 16, torch.bfloat16) == 10 * 10 * 2  # one block: the full square


@pytest.mark.parametrize("argv, match", [
    (["--seq-lens", "16,x"], "--seq-lens: 'x' is not an integer"),
    (["--blocks", "0"], "--blocks: every value must be >= 1"),
    (["--heads", "5", "--kv-heads", "2"], "--heads 5 must be a multiple of --kv-heads 2"),
])
def test_bad_options_are_named(argv, match, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert match in capsys.readouterr().err
