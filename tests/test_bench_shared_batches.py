"""bench.perf.shared_batches on the tiny fixture: both sides run, answers are identical, the file is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.perf import shared_batches
from tests.tiny_models import make_tiny_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "locomo_tiny.json"


def test_shared_batches_benchmark_on_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_MEM_KERNELS", "reference")
    ckpt = tmp_path / "ckpt"
    make_tiny_checkpoint(ckpt, "qwen2")
    out = tmp_path / "result.json"
    r = shared_batches.main(["--model", str(ckpt), "--data", str(FIXTURE), "--random-adapters", "--rank", "4",
                             "--batch-size", "4", "--max-new-tokens", "5", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(r))
    assert saved["questions"] == 14 and saved["conversations"] == 2
    assert saved["identical_answers"] == 14 and saved["differing_answers"] == 0
    assert saved["one_at_a_time"]["questions_per_second"] > 0 and saved["shared_speedup"] > 0
    assert saved["device"] and saved["versions"]["torch"]


def test_missing_adapter_directory_is_a_clear_error(tmp_path):
    ckpt = tmp_path / "ckpt"
    make_tiny_checkpoint(ckpt, "qwen2")
    with pytest.raises(SystemExit, match="no adapter directory"):
        shared_batches.main(["--model", str(ckpt), "--data", str(FIXTURE), "--adapters-from", str(tmp_path)])
