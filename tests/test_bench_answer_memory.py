"""bench.perf.memory end to end on the tiny LoCoMo fixture and a tiny model: every method run by both versions of the
code (here the same checkout twice), each process's peak memory and time, the predictions compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import locomo
from bench.common import REPO_ROOT
from bench.perf import memory
from tests.tiny_models import make_tiny_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "locomo_tiny.json"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_checkpoint(d, "llama")
    # a 2048-position window: retrieved turns are long in the byte-level tiny tokenizer (rotary positions extend)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 2048}))
    return d


def test_both_versions_every_method_one_file(ckpt, tmp_path):
    adapters = tmp_path / "lora"
    locomo.main(["--model", str(ckpt), "--data", str(FIXTURE), "--out", str(adapters), "--quiet", "--conversations",
                 "tiny-1", "--epochs", "1", "--seq-len", "64", "--rank", "4", "--max-questions", "2"])
    out = tmp_path / "memory.json"
    r = memory.main(["--before", str(REPO_ROOT), "--conversations", "tiny-1", "--data", str(FIXTURE),
                     "--adapters", str(adapters), "--lora-args=--rank 4",
                     f"--extra=--model {ckpt} --max-questions 2 --max-new-tokens 4 --top-k 2 --answer-memory-mb 64",
                     "--runs", str(tmp_path / "runs"), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(r))
    assert [(row["method"], row["side"]) for row in saved["rows"]] == [
        (m, s) for m in memory.METHODS for s in ("before", "after")]
    for row in saved["rows"]:
        assert "error" not in row, row
        assert row["peak_rss_bytes"] > 50 * 2**20 and row["process_seconds"] >= row["answer_seconds"] > 0
        assert row["questions"] == 2 and row["dtype"] == "float32"
    for method, c in saved["comparisons"].items():
        assert c["identical_predictions"] == c["questions"] == 2, method  # the same code twice
    assert saved["code"]["before"]["git_commit"] == saved["code"]["after"]["git_commit"]
    lora_rag = json.loads((tmp_path / "runs" / "after-lora-rag" / "results.json").read_text())
    assert lora_rag["settings"]["adapters_from"] == str(adapters)


def test_bad_input_is_one_line_before_any_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        memory.main(["--before", str(tmp_path), "--methods", "base", "--data", str(FIXTURE)])
    assert e.value.code == 2 and "--before" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        memory.main(["--before", str(REPO_ROOT), "--methods", "lora+rag", "--data", str(FIXTURE)])
    assert "--adapters" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        memory.main(["--before", str(REPO_ROOT), "--methods", "base,icl", "--data", str(FIXTURE)])
    assert "--methods" in capsys.readouterr().err
